"""PPO: GAE against a hand-computed example, KL estimators' values, token rewards, whitening, the adaptive KL
controller, Adam's ε placement, that the loss's gradient is the same however a minibatch is split, and that an
iteration's fused update equals its optimizer steps taken one by one."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llmjax import model
from llmjax.config import ModelConfig
from llmjax.rl import kl, ppo, reward_model, rollout
from llmjax.train import make_train_step

CFG = ModelConfig(vocab_size=7, block_size=10, n_layer=1, n_head=2, n_embd=16).validate()


def test_gae_hand_computed():
    # γ = 0.9, λ = 0.8 (γλ = 0.72). Row 1: δ = (1 + .9·1 − .5, 0 + .9·1.5 − 1, 2 − 1.5) = (1.4, .35, .5),
    # A = (1.4 + .72·.71, .35 + .72·.5, .5). Row 2 has 2 tokens; its masked third value (9) must not leak in:
    # δ = (.5 + .9·2 − 1, 1 − 2) = (1.3, −1), A = (1.3 − .72, −1).
    rewards = jnp.array([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0]])
    values = jnp.array([[0.5, 1.0, 1.5], [1.0, 2.0, 9.0]])
    mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    np.testing.assert_allclose(adv, [[1.9112, 0.71, 0.5], [0.58, -1.0, 0.0]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, [[2.4112, 1.71, 2.0], [1.58, 1.0, 0.0]], rtol=1e-5, atol=1e-6)


def test_gae_lambda_one_gamma_one_is_return_minus_value():
    """λ = γ = 1: A_t = (sum of rewards from t) − V_t, whatever the values (Monte-Carlo advantage)."""
    rng = np.random.default_rng(0)
    rewards, values = jnp.asarray(rng.normal(size=(2, 5))), jnp.asarray(rng.normal(size=(2, 5)))
    mask = jnp.ones((2, 5))
    adv, _ = ppo.gae(rewards, values, mask, 1.0, 1.0)
    to_go = np.cumsum(np.asarray(rewards)[:, ::-1], axis=1)[:, ::-1]
    np.testing.assert_allclose(adv, to_go - np.asarray(values), rtol=1e-5, atol=1e-5)


def test_kl_estimator_values():
    logp, ref = jnp.log(0.5), jnp.log(0.25)  # log r = log(ref/π) = −log 2
    np.testing.assert_allclose(kl.k1(logp, ref), math.log(2), rtol=1e-6)
    np.testing.assert_allclose(kl.k2(logp, ref), 0.5 * math.log(2) ** 2, rtol=1e-6)
    np.testing.assert_allclose(kl.k3(logp, ref), (0.5 - 1) + math.log(2), rtol=1e-6)


def test_k1_and_k3_are_unbiased_for_kl():
    """Their expectations under π are exactly KL(π ‖ π_ref); k3 is non-negative everywhere."""
    p = jnp.array([0.6, 0.3, 0.1])
    q = jnp.array([0.2, 0.5, 0.3])
    exact = float(jnp.sum(p * jnp.log(p / q)))
    np.testing.assert_allclose(jnp.sum(p * kl.k1(jnp.log(p), jnp.log(q))), exact, rtol=1e-6)
    np.testing.assert_allclose(jnp.sum(p * kl.k3(jnp.log(p), jnp.log(q))), exact, rtol=1e-6)
    assert (kl.k3(jnp.log(p), jnp.log(q)) >= 0).all() and (kl.k1(jnp.log(p), jnp.log(q)) < 0).any()


def test_token_rewards_put_the_score_on_the_last_token():
    kl_BN = jnp.array([[0.1, 0.2, 0.3, 0.0], [0.5, 0.0, 0.0, 0.0]])
    mask_BN = jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    r = ppo.token_rewards(jnp.array([2.0, -1.0]), kl_BN, mask_BN, beta=0.5)
    np.testing.assert_allclose(r, [[-0.05, -0.1, 2.0 - 0.15, 0.0], [-1.0 - 0.25, 0, 0, 0]], rtol=1e-6)


def test_whiten_uses_masked_tokens_only():
    x = jnp.array([[1.0, 2.0, 3.0, 100.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    w = ppo.whiten(x, mask)
    np.testing.assert_allclose(w[0, :3], np.array([-1.0, 0.0, 1.0]) / math.sqrt(2 / 3), rtol=1e-5)
    assert w[0, 3] == 0
    np.testing.assert_allclose(ppo.whiten(x, mask, shift_mean=False)[0, :3], w[0, :3] + 2.0, rtol=1e-5)


def test_adaptive_kl_controller():
    # KL twice the target: error clipped to +0.2, β grows by 0.2·n/horizon; at the target β stays.
    np.testing.assert_allclose(ppo.adaptive_kl_coef(0.1, 10.0, 5.0, horizon=100, n_samples=50), 0.1 * 1.1)
    np.testing.assert_allclose(ppo.adaptive_kl_coef(0.1, 4.0, 5.0, horizon=100, n_samples=50), 0.1 * (1 - 0.1))
    assert ppo.adaptive_kl_coef(0.1, 5.0, 5.0, horizon=100, n_samples=50) == 0.1


def test_adam_tf_epsilon_placement():
    """TF1 Adam: first step is lr·√(1−b2)/(1−b1)·m/(√v + ε) = lr·g/(|g| + ε/√(1−b2)); torch: lr·g/(|g| + ε)."""
    g = {"w": jnp.array([1e-3, -2.0])}
    eps, b1, b2 = 1e-2, 0.9, 0.999
    tf_step, _ = ppo.scale_by_adam_tf(b1, b2, eps).update(g, ppo.scale_by_adam_tf(b1, b2, eps).init(g))
    torch_opt = optax.scale_by_adam(b1, b2, eps)
    torch_step, _ = torch_opt.update(g, torch_opt.init(g))
    gw = np.asarray(g["w"])
    np.testing.assert_allclose(tf_step["w"], gw / (np.abs(gw) + eps / math.sqrt(1 - b2)), rtol=1e-5)
    np.testing.assert_allclose(torch_step["w"], gw / (np.abs(gw) + eps), rtol=1e-5)


def test_loss_weights_modes():
    mask = jnp.array([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(ppo.loss_weights(mask, "token_mean"), mask / 5)
    np.testing.assert_allclose(ppo.loss_weights(mask, "seq_mean"), mask * jnp.array([[1 / 8], [1 / 2]]))
    np.testing.assert_allclose(ppo.loss_weights(mask, "seq_sum", n_micro=2), mask)


# ------------------------------------------------------------------------------------------- the loss itself


@functools.cache
def ppo_params():
    lm = model.init(CFG, jax.random.key(0)) | {"wte": 0.5 * jax.random.normal(jax.random.key(1), (7, 16))}
    return {"policy": lm, "value": reward_model.init(lm, CFG, jax.random.key(2), head_std=0.3)}


def ppo_batch():
    prompt_BP, lens_B = rollout.pad_prompts([[2, 3], [4], [5, 6], [3]], 2, 0)
    tokens_BN, lengths_B = rollout.pad_responses([[4, 1], [2, 3, 5, 1], [1], [6, 6, 1]], 4, 0)
    mask_BN = rollout.response_mask(jnp.asarray(lengths_B), 4)
    rng = np.random.default_rng(0)
    noise = lambda: jnp.asarray(rng.normal(size=(4, 4)), jnp.float32) * mask_BN  # noqa: E731
    return {"prompt_BP": prompt_BP, "prompt_lens_B": lens_B, "tokens_BN": tokens_BN,
            "old_logp_BN": -1.5 + 0.3 * noise(), "old_values_BN": noise(), "adv_BN": noise(),
            "returns_BN": noise()}, mask_BN


def test_ppo_gradient_is_micro_batch_invariant():
    """Weights computed on the whole minibatch: 1 or 4 micro-batches give the same update (policy and value), for
    every aggregation mode (the weights are data, so one compiled step per micro-batch count serves all modes)."""
    pc = ppo.PPOConfig(clip_ratio=0.1, entropy_coef=0.01).validate()
    batch, mask_BN = ppo_batch()
    steps = {n: jax.jit(make_train_step(ppo.ppo_loss(CFG, pc), optax.sgd(1.0))) for n in (1, 4)}
    for mode in ppo.AGGREGATIONS:
        deltas = {}
        for n_micro, step in steps.items():
            state = {"step": jnp.int32(0), "params": ppo_params(), "opt_state": optax.sgd(1.0).init(ppo_params())}
            full = batch | {"weight_BN": ppo.loss_weights(mask_BN, mode, n_micro)}
            new, _ = step(state, rollout.add_micro_axis(full, n_micro), jax.random.key(0))
            deltas[n_micro] = jax.tree.map(jnp.subtract, ppo_params(), new["params"])
        assert float(optax.tree.norm(deltas[1]["value"])) > 0 and float(optax.tree.norm(deltas[1]["policy"])) > 0
        for a, b in zip(jax.tree.leaves(deltas[1]), jax.tree.leaves(deltas[4]), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, err_msg=mode)


@pytest.mark.slow  # ~10 CPU-seconds of compiles: the fast suite keeps the acceptance tests
def test_ppo_loss_clips_the_ratio_and_the_value():
    """Hand-computed on the loss's own forward: far-off old log-probs clip the surrogate, far-off old values the
    value loss; padding tokens contribute nothing."""
    pc = ppo.PPOConfig(aggregation="token_mean", vf_coef=0.5, clip_ratio=0.2, clip_value=0.2).validate()
    batch, mask_BN = ppo_batch()
    params = ppo_params()
    logp_BN, _ = rollout.token_logprobs(params["policy"], batch["prompt_BP"], batch["prompt_lens_B"],
                                        batch["tokens_BN"], CFG)
    values_BN = reward_model.values(params["value"], batch["prompt_BP"], batch["prompt_lens_B"], batch["tokens_BN"],
                                    CFG)
    batch = batch | {"old_logp_BN": logp_BN - 1.0, "adv_BN": jnp.ones((4, 4)),  # ratio e ≈ 2.7: clipped at 1.2
                     "old_values_BN": values_BN + 5.0, "returns_BN": values_BN + 1.0,  # clipped V: V + 4.8
                     "weight_BN": ppo.loss_weights(mask_BN, "token_mean")}
    loss, _ = ppo.ppo_loss(CFG, pc)(params, batch, jax.random.key(0))
    # surrogate = min(e·1, 1.2·1) = 1.2; value loss = ½·max(1², 3.8²).
    np.testing.assert_allclose(float(loss), -1.2 + 0.5 * 0.5 * 3.8**2, rtol=1e-4)
    stats = ppo.diagnostics(params, batch | {"mask_BN": mask_BN}, cfg=CFG, pc=pc)
    assert float(stats["clip_frac"]) == 1.0
    np.testing.assert_allclose(float(stats["approx_kl"]), math.exp(-1), rtol=1e-5)  # k3 = (e^−1 − 1) + 1


def test_fused_update_matches_sequential_steps_with_a_runtime_learning_rate():
    """One compiled scan over an iteration's epochs × minibatches equals the same optimizer steps taken one at a time,
    and the peak learning rate is a value in the optimizer state: arms that differ only in it share one compile."""
    pc = ppo.PPOConfig(epochs=2, minibatches=2, rollouts_per_iter=4, warmup_iters=1, learning_rate=3e-3).validate()
    other = dataclasses.replace(pc, learning_rate=1e-4, kl_coef=0.01, adaptive_kl=True)
    assert ppo._compiled_update(CFG, ppo._static(pc)) is ppo._compiled_update(CFG, ppo._static(other))
    batch, mask_BN = ppo_batch()
    batch = batch | {"mask_BN": mask_BN}
    optimizer, update = ppo._compiled_update(CFG, ppo._static(pc))
    params = jax.tree.map(jnp.copy, ppo_params())
    state = {"step": jnp.int32(0), "params": params,
             "opt_state": ppo.set_learning_rate(optimizer.init(params), pc.learning_rate)}
    order_KR = np.array([[0, 3], [1, 2], [2, 0], [3, 1]])
    fused, _ = update(state, batch, order_KR, np.array([0, 0, 1, 1], np.int32), jax.random.key(0))

    plain = ppo.make_adam(optax.linear_schedule(pc.learning_rate / 4, pc.learning_rate, 4), pc.adam_eps, "torch", 1.0)
    step = jax.jit(make_train_step(ppo.ppo_loss(CFG, pc), plain))
    state = {"step": jnp.int32(0), "params": ppo_params(), "opt_state": plain.init(ppo_params())}
    for rows in order_KR:
        mini = {k: batch[k][rows] for k in ppo._MINIBATCH_KEYS}
        mini["weight_BN"] = ppo.loss_weights(mask_BN[rows], pc.aggregation)
        state, _ = step(state, rollout.add_micro_axis(mini), jax.random.key(0))
    assert float(optax.tree.norm(jax.tree.map(jnp.subtract, state["params"], ppo_params()))) > 1e-3
    for a, b in zip(jax.tree.leaves(fused["params"]), jax.tree.leaves(state["params"]), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)
