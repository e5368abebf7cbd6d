"""DPO: the per-pair losses against hand-computed values, the loss on a model against sums of teacher-forced
log-probs, log 2 at the reference, the SFT term, and micro-batch invariance."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llmjax import model
from llmjax.config import ModelConfig
from llmjax.errors import UserError
from llmjax.rl import dpo, rollout
from llmjax.train import make_train_step

CFG = ModelConfig(vocab_size=7, block_size=10, n_layer=1, n_head=2, n_embd=16).validate()


def test_pair_losses_hand_computed():
    h = jnp.array([2.0, -1.0])
    # β = 0.5: −log σ(1) = log(1 + e^−1); −log σ(−0.5) = log(1 + e^0.5).
    dpo_loss = dpo.pair_loss(h, dpo.DPOConfig(beta=0.5))
    np.testing.assert_allclose(dpo_loss, [math.log1p(math.exp(-1)), math.log1p(math.exp(0.5))], rtol=1e-6)
    # conservative DPO, ε = 0.1: 0.9·(−log σ(βh)) + 0.1·(−log σ(−βh)).
    c = dpo.pair_loss(h, dpo.DPOConfig(beta=0.5, label_smoothing=0.1))
    np.testing.assert_allclose(c[0], 0.9 * math.log1p(math.exp(-1)) + 0.1 * math.log1p(math.exp(1)), rtol=1e-6)
    # IPO, β = 0.5: (h − 1/(2β))² = (h − 1)².
    np.testing.assert_allclose(dpo.pair_loss(h, dpo.DPOConfig(beta=0.5, loss="ipo")), [1.0, 4.0], rtol=1e-6)


def test_config_validation():
    with pytest.raises(UserError, match="label_smoothing"):
        dpo.DPOConfig(loss="ipo", label_smoothing=0.1).validate()
    with pytest.raises(UserError, match="beta"):
        dpo.DPOConfig(beta=0.0).validate()


@functools.cache
def params(seed: int = 0) -> model.Params:
    return model.init(CFG, jax.random.key(seed)) | {"wte": 0.5 * jax.random.normal(jax.random.key(seed + 1), (7, 16))}


def pairs() -> dict[str, np.ndarray]:
    prompt_BP, lens_B = rollout.pad_prompts([[2, 3], [4], [5, 6], [3]], 2, 0)
    chosen_BN, chosen_len_B = rollout.pad_responses([[4, 1], [2, 3, 5, 1], [1], [6, 6, 1]], 4, 0)
    rejected_BN, rejected_len_B = rollout.pad_responses([[5, 5, 1], [1], [3, 2, 1], [2, 4, 6, 1]], 4, 0)
    return {"prompt_BP": prompt_BP, "prompt_lens_B": lens_B, "chosen_BN": chosen_BN, "chosen_len_B": chosen_len_B,
            "rejected_BN": rejected_BN, "rejected_len_B": rejected_len_B}


def summed(p: model.Params, data: dict, side: str) -> np.ndarray:
    logp_BN, _ = rollout.token_logprobs(p, data["prompt_BP"], data["prompt_lens_B"], data[f"{side}_BN"], CFG)
    return np.sum(np.asarray(logp_BN) * np.asarray(rollout.response_mask(data[f"{side}_len_B"], 4)), axis=1)


@pytest.mark.slow  # ~10 CPU-seconds of compiles: the fast suite keeps the acceptance tests
def test_reference_logprobs_are_summed_over_the_response_only():
    data = pairs()
    ref = dpo.reference_logprobs(params(), data, CFG, chunk=3)  # chunks wrap around: 4 rows in 2 chunks of 3
    np.testing.assert_allclose(ref["ref_chosen_B"], summed(params(), data, "chosen"), rtol=1e-5)
    np.testing.assert_allclose(ref["ref_rejected_B"], summed(params(), data, "rejected"), rtol=1e-5)
    # Tokens after EOS are padding: changing them changes nothing.
    data["chosen_BN"][0, 3] = 6
    np.testing.assert_allclose(dpo.reference_logprobs(params(), data, CFG)["ref_chosen_B"], ref["ref_chosen_B"],
                               rtol=1e-6)


@pytest.mark.parametrize("dc", [dpo.DPOConfig(beta=0.3), dpo.DPOConfig(beta=0.3, label_smoothing=0.2),
                                dpo.DPOConfig(beta=0.3, loss="ipo"), dpo.DPOConfig(beta=0.3, sft_coef=0.5)])
def test_dpo_loss_on_a_model_matches_hand_computation(dc):
    data = pairs()
    data.update(dpo.reference_logprobs(params(0), data, CFG))
    policy = params(5)
    batch = dpo.make_batch(data, np.arange(4))
    loss, _ = dpo.dpo_loss(CFG, dc)(policy, batch, jax.random.key(0))
    h = (summed(policy, data, "chosen") - data["ref_chosen_B"]) - (
        summed(policy, data, "rejected") - data["ref_rejected_B"])
    expected = float(np.mean(dpo.pair_loss(jnp.asarray(h), dc)))
    if dc.sft_coef:
        expected += dc.sft_coef * -summed(policy, data, "chosen").sum() / data["chosen_len_B"].sum()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_dpo_loss_at_the_reference_is_log_two():
    data = pairs()
    data.update(dpo.reference_logprobs(params(), data, CFG))
    loss, _ = dpo.dpo_loss(CFG, dpo.DPOConfig(beta=0.1))(params(), dpo.make_batch(data, np.arange(4)), None)
    np.testing.assert_allclose(float(loss), math.log(2), rtol=1e-5)


def test_dpo_gradient_is_micro_batch_invariant():
    data = pairs()
    data.update(dpo.reference_logprobs(params(0), data, CFG))
    dc = dpo.DPOConfig(beta=0.3, sft_coef=0.5)
    deltas = []
    step = jax.jit(make_train_step(dpo.dpo_loss(CFG, dc), optax.sgd(1.0)))
    for n_micro in (1, 4):
        state = {"step": jnp.int32(0), "params": params(5), "opt_state": optax.sgd(1.0).init(params(5))}
        batch = rollout.add_micro_axis(dpo.make_batch(data, np.arange(4), n_micro), n_micro)
        new, _ = step(state, batch, jax.random.key(0))
        deltas.append(jax.tree.map(jnp.subtract, params(5), new["params"]))
    assert float(optax.tree.norm(deltas[0])) > 0
    for other in deltas[1:]:
        for a, b in zip(jax.tree.leaves(deltas[0]), jax.tree.leaves(other), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow  # ~10 CPU-seconds of compiles: the fast suite keeps the acceptance tests
def test_dpo_raises_the_chosen_over_the_rejected():
    """A few steps of DPO on the pairs increase the margin h on them (the loss's sign is right)."""
    data = pairs()
    data.update(dpo.reference_logprobs(params(), data, CFG))
    step = jax.jit(make_train_step(dpo.dpo_loss(CFG, dpo.DPOConfig(beta=0.5)), optax.adam(1e-2)))
    state = {"step": jnp.int32(0), "params": params(), "opt_state": optax.adam(1e-2).init(params())}
    batch = dpo.make_batch(data, np.arange(4))
    for _ in range(5):
        state, _ = step(state, rollout.add_micro_axis(batch), jax.random.key(0))
    h, _ = dpo.margins(state["params"], batch, CFG)
    assert (np.asarray(h) > 0).all()
