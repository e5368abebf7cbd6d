"""Sliding-window attention: a window as long as the sequence is full attention, and decoding with a rolling
(ring-buffer) cache of `sliding_window` slots equals full recompute and uses memory independent of the number of
generated tokens."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_decoding import apply, random_params, recompute_greedy

from llmjax import model
from llmjax.config import from_preset
from llmjax.generate import SamplingConfig, generate, left_pad

GREEDY = SamplingConfig(temperature=0.0)
PROMPTS = [[5, 1, 7], [2, 9, 4, 4, 8, 3, 1], [6]]
N_NEW = 12
WINDOW = 4


def tiny(**overrides):
    fields = dict(n_layer=2, n_head=4, n_embd=32, vocab_size=29, block_size=24, sliding_window=WINDOW)
    return from_preset("llama_small", **{**fields, **overrides})[0]


def test_window_at_least_the_sequence_length_is_full_attention():
    cfg = tiny(sliding_window=None, block_size=8)
    params = random_params(cfg)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 8)), jnp.int32)
    full = apply(params, tokens, cfg)
    for window in (8, 13):
        np.testing.assert_array_equal(apply(params, tokens, dataclasses.replace(cfg, sliding_window=window)), full)
    assert not np.allclose(apply(params, tokens, dataclasses.replace(cfg, sliding_window=7)), full, atol=1e-3)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(scan_layers=False),  # GQA: 2 K/V heads
        dict(scan_layers=True, n_kv_head=None, mla_kv_rank=12, mla_rope_dim=4),  # latent cache in a ring too
    ],
)
def test_rolling_cache_decoding_equals_full_recompute(overrides):
    """Prompts of up to 7 tokens + 12 generated, window 4: the ring of 4 slots wraps several times, the longest
    prompt alone overflows it, and every row still picks the tokens of a windowed recompute."""
    cfg = tiny(**overrides)
    params = random_params(cfg)
    prompt_BP, lens_B = left_pad(PROMPTS)
    tokens, _, _ = generate(params, jnp.asarray(prompt_BP), jnp.asarray(lens_B), jax.random.key(0), cfg=cfg,
                            max_new_tokens=N_NEW, sc=GREEDY)
    for row, prompt in enumerate(PROMPTS):
        assert np.asarray(tokens[row]).tolist() == recompute_greedy(params, prompt, N_NEW, cfg), f"row {row}"


@pytest.mark.slow
def test_rolling_cache_has_window_slots_and_decode_memory_does_not_grow():
    """The cache holds `sliding_window` slots however long the generation, and the compiled decoder's working
    memory (XLA's temporaries; the returned tokens are outputs) is identical for 16 and 160 new tokens, where a full
    cache needs at least the keys and values of the 144 extra positions more."""
    cfg = tiny()
    assert model.init_cache(cfg, 3, 200)["k"].shape == (2, 3, WINDOW, 2, 8)
    assert model.init_cache(dataclasses.replace(cfg, sliding_window=None), 3, 200)["k"].shape == (2, 3, 200, 2, 8)
    params = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
    prompt, lens = jax.ShapeDtypeStruct((3, 8), jnp.int32), jax.ShapeDtypeStruct((3,), jnp.int32)

    def temp_bytes(c, n):
        compiled = generate.lower(params, prompt, lens, jax.random.key(0), cfg=c, max_new_tokens=n, sc=GREEDY).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    rolling = temp_bytes(cfg, 16)
    assert temp_bytes(cfg, 160) == rolling
    kv_bytes = model.kv_cache_bytes_per_token(cfg) * 3  # per position, all 3 rows
    assert temp_bytes(dataclasses.replace(cfg, sliding_window=None), 160) >= rolling + 144 * kv_bytes
