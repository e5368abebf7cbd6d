"""Rollouts: teacher-forced log-probs equal the sampler's, masks partition the row, aggregation weights are exact and
micro-batch invariant."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llmjax import model
from llmjax.config import ModelConfig
from llmjax.generate import SamplingConfig
from llmjax.rl import rollout
from llmjax.train import make_train_step

PAD, EOS = 0, 1
CFG = ModelConfig(vocab_size=7, block_size=12, n_layer=1, n_head=2, n_embd=16).validate()
logprobs = jax.jit(rollout.token_logprobs, static_argnames=("cfg", "temperature", "group_size"))


@functools.cache
def params(cfg: ModelConfig = CFG) -> model.Params:
    # A larger init scale than GPT-2's so the distribution is far from uniform and log-probs differ per token.
    return model.init(cfg, jax.random.key(0)) | {"wte": 0.5 * jax.random.normal(jax.random.key(1), (7, 16))}


def prompts() -> tuple[np.ndarray, np.ndarray]:
    return rollout.pad_prompts([[2, 3, 4, 5], [6], [3, 3]], width=5, pad_id=PAD)


def test_pad_prompts_and_responses_layout():
    prompt_BP, lens_B = prompts()
    np.testing.assert_array_equal(prompt_BP, [[0, 2, 3, 4, 5], [0, 0, 0, 0, 6], [0, 0, 0, 3, 3]])
    np.testing.assert_array_equal(lens_B, [4, 1, 2])
    tokens_BN, lengths_B = rollout.pad_responses([[4, EOS], [EOS], [2, 3, 5]], width=4, pad_id=PAD)
    np.testing.assert_array_equal(tokens_BN, [[4, 1, 0, 0], [1, 0, 0, 0], [2, 3, 5, 0]])
    np.testing.assert_array_equal(rollout.response_mask(jnp.asarray(lengths_B), 4),
                                  [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])


def test_layout_masks_partition_the_row():
    _, lens_B = prompts()
    masks = rollout.layout_masks(jnp.asarray(lens_B), 5, jnp.array([2, 1, 4]), 4)
    np.testing.assert_array_equal(masks["prompt"][1], [0, 0, 0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(masks["response"][0], [0, 0, 0, 0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(masks["response"][2], [0, 0, 0, 0, 0, 1, 1, 1, 1])
    total = masks["prompt"].astype(int) + masks["response"].astype(int) + masks["padding"].astype(int)
    assert (total == 1).all()
    np.testing.assert_array_equal(masks["padding"][1], [1, 1, 1, 1, 0, 0, 1, 1, 1])


@pytest.mark.parametrize("cfg,temperature", [
    (CFG, 1.0),
    (CFG, 0.7),
    (ModelConfig(vocab_size=7, block_size=12, n_layer=1, n_head=2, n_embd=16, position="rope", norm="rmsnorm",
                 sliding_window=3).validate(), 1.0),
])
def test_teacher_forced_logprobs_match_the_sampler(cfg, temperature):
    """The ratio π/π_old starts at exactly 1 only if the loss recomputes the sampler's log-probs (padding, positions,
    temperature and all): a mismatch would bias every importance ratio."""
    prompt_BP, lens_B = prompts()
    sc = SamplingConfig(temperature=temperature, stop_token=EOS, pad_id=PAD)
    out = rollout.sample_groups(params(cfg), prompt_BP, lens_B, jax.random.key(3), cfg=cfg, group_size=4,
                                max_new_tokens=6, sc=sc)
    assert out["tokens_BN"].shape == (12, 6)
    np.testing.assert_array_equal(out["prompt_BP"][4:8], np.repeat(prompt_BP[1:2], 4, axis=0))  # rows b·G + g
    logp_BN, entropy_BN = logprobs(params(cfg), out["prompt_BP"], out["prompt_lens_B"], out["tokens_BN"],
                                   cfg=cfg, temperature=temperature)
    mask_BN = np.asarray(out["mask_BN"])
    assert mask_BN.sum() > 12 and (np.asarray(out["logp_BN"])[mask_BN == 0] == 0).all()
    np.testing.assert_allclose(np.asarray(logp_BN) * mask_BN, out["logp_BN"], atol=2e-5)
    assert (np.asarray(entropy_BN) > 0).all() and (np.asarray(entropy_BN) <= np.log(7) + 1e-5).all()
    # Each prompt run once for its group of 4 (through a KV cache, a ring of 3 slots with the sliding window).
    grouped_BN, grouped_entropy_BN = logprobs(params(cfg), out["prompt_BP"], out["prompt_lens_B"], out["tokens_BN"],
                                              cfg=cfg, temperature=temperature, group_size=4)
    np.testing.assert_allclose(grouped_BN, logp_BN, atol=2e-5)
    np.testing.assert_allclose(grouped_entropy_BN, entropy_BN, atol=2e-5)


def test_shared_prompt_gradient_equals_per_row():
    """Running a group's prompt once sums its G rows' gradients through the shared keys/values: the same gradient as
    running every row in full; rows that do not split into groups are refused."""
    prompt_BP, lens_B = prompts()
    prompt_BP, lens_B = np.repeat(prompt_BP, 2, axis=0), np.repeat(lens_B, 2, axis=0)
    tokens_BN = jnp.asarray(np.random.default_rng(0).integers(1, 7, (6, 4)), jnp.int32)
    weight_BN = jnp.asarray(np.random.default_rng(1).normal(size=(6, 4)), jnp.float32)

    def grad(group_size: int) -> model.Params:
        return jax.grad(lambda p: jnp.sum(weight_BN * rollout.token_logprobs(
            p, prompt_BP, lens_B, tokens_BN, CFG, group_size=group_size)[0]))(params())

    per_row, shared = grad(1), grad(2)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(per_row)) > 1e-2
    for g_row, g_shared in zip(jax.tree.leaves(per_row), jax.tree.leaves(shared), strict=True):
        np.testing.assert_allclose(g_shared, g_row, atol=1e-5)
    with pytest.raises(ValueError, match="groups of 4"):
        rollout.token_logprobs(params(), prompt_BP, lens_B, tokens_BN, CFG, group_size=4)


def test_logprobs_ignore_left_padding():
    """A prompt's response log-probs don't depend on how much padding precedes it."""
    tokens_BN = jnp.array([[4, 2, EOS]])
    narrow, lens = rollout.pad_prompts([[2, 3]], 2, PAD)
    wide, _ = rollout.pad_prompts([[2, 3]], 5, PAD)
    a, _ = logprobs(params(), narrow, lens, tokens_BN, cfg=CFG)
    b, _ = logprobs(params(), wide, lens, tokens_BN, cfg=CFG)
    np.testing.assert_allclose(a, b, atol=1e-5)


MASK = jnp.array([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]], jnp.float32)  # lengths 4, 1, 2: 7 tokens, N = 4


@pytest.mark.parametrize("mode,expected_B", [
    ("token_mean", [1 / 7, 1 / 7, 1 / 7]),  # every token equal
    ("seq_mean", [1 / (3 * 4), 1 / (3 * 1), 1 / (3 * 2)]),  # each sequence's tokens share 1/B
    ("constant", [1 / 12, 1 / 12, 1 / 12]),  # 1 / (B · N), whatever the lengths
])
def test_aggregation_denominators(mode, expected_B):
    w_BN = rollout.aggregation_weights(MASK, mode)
    np.testing.assert_allclose(w_BN, MASK * jnp.array(expected_B)[:, None], rtol=1e-6)
    np.testing.assert_allclose(rollout.aggregation_weights(MASK, mode, n_micro=3), 3 * w_BN, rtol=1e-6)


def test_nll_gradient_is_micro_batch_invariant():
    """Weights computed over the whole batch make the accumulated gradient of 4 micro-batches equal one batch's."""
    prompt_BP, lens_B = rollout.pad_prompts([[2, 3], [4], [5, 6], [3]], 2, PAD)
    tokens_BN, lengths_B = rollout.pad_responses([[4, EOS], [2, 3, 5, EOS], [EOS], [6, 6, EOS]], 4, PAD)
    mask_BN = rollout.response_mask(jnp.asarray(lengths_B), 4)
    loss_fn = rollout.nll_loss(CFG)
    grads = {}
    for n_micro in (1, 4):
        batch = {"prompt_BP": prompt_BP, "prompt_lens_B": lens_B, "tokens_BN": tokens_BN,
                 "weight_BN": rollout.aggregation_weights(mask_BN, "token_mean", n_micro)}
        step = make_train_step(loss_fn, optax.sgd(1.0))
        state = {"step": jnp.int32(0), "params": params(), "opt_state": optax.sgd(1.0).init(params())}
        new, metrics = jax.jit(step)(state, rollout.add_micro_axis(batch, n_micro), jax.random.key(0))
        grads[n_micro] = jax.tree.map(jnp.subtract, params(), new["params"])
        if n_micro == 1:
            expected = -float(jnp.sum(logprobs(params(), prompt_BP, lens_B, tokens_BN, cfg=CFG)[0] * mask_BN)
                              / mask_BN.sum())
            np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[4]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
