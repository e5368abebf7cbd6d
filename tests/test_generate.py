"""KV-cache decoding: equal to recomputing the whole sequence, batched left-padded prompts, stop tokens, sampling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_decoding import random_params, recompute_greedy

from llmjax.config import ModelConfig, from_preset
from llmjax.errors import UserError
from llmjax.generate import SamplingConfig, check_fits, filter_logits, generate, left_pad, sample_long

GREEDY = SamplingConfig(temperature=0.0)
PROMPTS = [[5, 1, 7], [2, 9, 4, 4, 8, 3, 1], [6]]
N_NEW = 10


def tiny(position: str, scan: bool = False, **overrides) -> ModelConfig:
    preset = "gpt2" if position == "learned" else "llama_small"  # llama_small: RoPE and 2 K/V heads for 4
    fields = dict(n_layer=2, n_head=4, n_embd=32, vocab_size=29, block_size=24, scan_layers=scan)
    return from_preset(preset, **{**fields, **overrides})[0]


def run(params, cfg, sc=GREEDY, prompts=PROMPTS, n=N_NEW, seed=0):
    prompt_BP, lens_B = left_pad(prompts)
    tokens, logprobs, lengths = generate(
        params, jnp.asarray(prompt_BP), jnp.asarray(lens_B), jax.random.key(seed), cfg=cfg, max_new_tokens=n, sc=sc
    )
    return np.asarray(tokens), np.asarray(logprobs), np.asarray(lengths)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("position", ["learned", "rope"])
def test_cached_greedy_equals_full_recompute(position, scan):
    """Batched, left-padded cached decoding picks, row by row, the tokens an uncached unpadded decode picks."""
    cfg = tiny(position, scan)
    params = random_params(cfg)
    tokens, logprobs, lengths = run(params, cfg)
    for row, prompt in enumerate(PROMPTS):
        assert tokens[row].tolist() == recompute_greedy(params, prompt, N_NEW, cfg), f"row {row}"
    assert np.all(lengths == N_NEW)
    assert np.all(logprobs <= 0) and np.all(logprobs > -math.log(cfg.vocab_size) * 10)


def test_left_pad_right_aligns_prompts():
    """left_pad puts every prompt at the right end of a common length and reports the real lengths."""
    prompt_BP, lens_B = left_pad([[1, 2], [3, 4, 5], [6]], pad_id=9)
    np.testing.assert_array_equal(prompt_BP, [[9, 1, 2], [3, 4, 5], [9, 9, 6]])
    np.testing.assert_array_equal(lens_B, [2, 3, 1])
    with pytest.raises(UserError, match="at least one token"):
        left_pad([[1], []])


def test_stop_token_ends_a_row_and_pads_after():
    """A row stops at its first stop token: later slots hold pad_id with logprob 0, the length counts the stop."""
    cfg = tiny("rope")
    params = random_params(cfg)
    free, free_logprobs, _ = run(params, cfg)
    stop = int(free[0, 3])
    pad = cfg.vocab_size  # not a real token, so padding cannot be confused with generated tokens
    tokens, logprobs, lengths = run(params, cfg, SamplingConfig(temperature=0.0, stop_token=stop, pad_id=pad))
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(free[row] == stop)
        n = hits[0] + 1 if hits.size else N_NEW
        assert lengths[row] == n
        np.testing.assert_array_equal(tokens[row, :n], free[row, :n])
        assert np.all(tokens[row, n:] == pad) and np.all(logprobs[row, n:] == 0.0)
        np.testing.assert_allclose(logprobs[row, :n], free_logprobs[row, :n], atol=1e-5)
    assert lengths[0] <= 4


def test_top_k_1_equals_greedy():
    """Sampling at temperature 1 from only the top token is greedy decoding, with log-probability 0."""
    cfg = tiny("learned")
    params = random_params(cfg)
    greedy, _, _ = run(params, cfg)
    sampled, logprobs, _ = run(params, cfg, SamplingConfig(temperature=1.0, top_k=1), seed=7)
    np.testing.assert_array_equal(sampled, greedy)
    np.testing.assert_allclose(logprobs, 0.0, atol=1e-6)


def test_top_p_keeps_the_smallest_set_reaching_p():
    """Probabilities (.15, .5, .05, .3): p=.4 keeps {.5}; p=.7 keeps {.5, .3}; p=.85 adds .15; p=1 keeps all."""
    logits = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3]]))
    kept = lambda p: np.isfinite(np.asarray(filter_logits(logits, None, p)))[0].tolist()
    assert kept(0.4) == [False, True, False, False]
    assert kept(0.7) == [False, True, False, True]
    assert kept(0.85) == [True, True, False, True]
    assert kept(1.0) == [True, True, True, True]
    assert kept(1e-6) == [False, True, False, False]  # the top token always survives
    kept_k = np.isfinite(np.asarray(filter_logits(logits, 2, None)))[0].tolist()
    assert kept_k == [False, True, False, True]


def test_sampling_is_deterministic_per_key():
    """Temperature sampling draws the same tokens for the same key and different ones for another key."""
    cfg = tiny("rope")
    params = random_params(cfg)
    sc = SamplingConfig(temperature=1.5)
    a, la, _ = run(params, cfg, sc, seed=1)
    b, lb, _ = run(params, cfg, sc, seed=1)
    c, _, _ = run(params, cfg, sc, seed=2)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("window", [None, 4])
def test_samples_per_prompt_equal_repeated_prompts(window):
    """Prefilling each prompt once for its S samples draws exactly what decoding S copies of it draws."""
    cfg = tiny("rope", sliding_window=window)
    params = random_params(cfg)
    prompt_QP, lens_Q = (jnp.asarray(a) for a in left_pad(PROMPTS))
    sc = SamplingConfig(temperature=1.5)
    shared = generate(params, prompt_QP, lens_Q, jax.random.key(4), cfg=cfg, max_new_tokens=N_NEW, sc=sc,
                      samples_per_prompt=3)
    copies = generate(params, jnp.repeat(prompt_QP, 3, axis=0), jnp.repeat(lens_Q, 3), jax.random.key(4), cfg=cfg,
                      max_new_tokens=N_NEW, sc=sc)
    assert shared[0].shape == (9, N_NEW) and len(set(map(tuple, np.asarray(shared[0][:3])))) > 1
    np.testing.assert_array_equal(shared[0], copies[0])
    np.testing.assert_allclose(shared[1], copies[1], atol=1e-5)
    np.testing.assert_array_equal(shared[2], copies[2])


def test_sample_long_goes_past_the_context_length():
    """sample_long produces more tokens than block_size with learned positions; its first window is plain greedy."""
    cfg = tiny("learned", block_size=16)
    params = random_params(cfg)
    prompt = [3, 1, 4]
    with pytest.raises(UserError, match="block_size=16"):
        check_fits(cfg, len(prompt), 40)
    out = sample_long(params, prompt, jax.random.key(0), cfg=cfg, num_tokens=40, sc=GREEDY)
    assert len(out) == 40 and all(0 <= t < cfg.vocab_size for t in out)
    first_window = 16 - len(prompt)
    assert out[:first_window] == recompute_greedy(params, prompt, first_window, cfg)
