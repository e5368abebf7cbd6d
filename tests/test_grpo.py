"""GRPO: group advantages against hand-computed values, KL estimators, the clipped loss and its aggregation modes, the
rollout statistics, and (slow) the experiment's smoke run."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import model
from llmjax.config import ModelConfig, TrainConfig
from llmjax.errors import UserError
from llmjax.rl import grpo, kl, rollout, tasks

# ----------------------------------------------------------------------------------------------------- advantages


def test_group_advantages_hand_computed():
    # Group 1: rewards 1, 0, 0, 1 → mean 0.5, unbiased std sqrt(1/3); group 2: all equal → 0 everywhere.
    rewards = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    s = math.sqrt(1 / 3)
    a = 0.5 / (s + 1e-4)
    np.testing.assert_allclose(grpo.group_advantages(rewards, 4, "group"), [a, -a, -a, a, 0, 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(grpo.group_advantages(rewards, 4, "none"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    # batch: the same centring, divided by the std of all 8 rewards (mean 0.75, unbiased std sqrt(1.5/7)).
    b = 0.5 / (math.sqrt(1.5 / 7) + 1e-4)
    np.testing.assert_allclose(grpo.group_advantages(rewards, 4, "batch"), [b, -b, -b, b, 0, 0, 0, 0], rtol=1e-6)


def test_group_advantages_graded_rewards():
    # rewards 0, 1, 2 (G = 3): mean 1, unbiased std 1 → -1, 0, 1 (eps aside).
    np.testing.assert_allclose(grpo.group_advantages(jnp.array([0.0, 1.0, 2.0]), 3, "group", eps=0.0), [-1, 0, 1])


def test_rollout_stats():
    rewards = np.array([1, 0, 0, 0, 1, 1, 0, 0], np.float32)  # groups of 2: (1,0) (0,0) (1,1) (0,0)
    lengths = np.array([3, 5, 6, 6, 2, 4, 6, 2])
    reference_lens = np.array([3, 3, 4, 4, 2, 2, 5, 5])
    stats = grpo.rollout_stats(rewards, lengths, reference_lens, 2)
    assert stats["zero_var_frac"] == 0.75
    assert stats["reward"] == 3 / 8
    assert stats["len_correct"] == 3.0 and stats["len_incorrect"] == 5.0
    assert stats["len_incorrect_excess"] == (2 + 2 + 2 + 1 - 3) / 5  # incorrect rows 1, 2, 3, 6, 7


def test_paired_length_change_follows_problems_not_the_mix():
    """Problem 0 stays wrong at length 3, problem 1's wrong answers go 2 → 4, problem 2 is wrong only early, problem 3
    only late and long: the change is the mean over problems 0 and 1 (0 and +2), whatever the mix of the rest."""
    problem_IB = np.array([[0, 1, 2], [0, 2, 2], [0, 1, 3], [3, 1, 3]])
    lengths_IB = np.array([[3, 2, 9], [3, 9, 1], [3, 4, 9], [9, 4, 9]])
    correct_IB = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]], bool)
    out = grpo.paired_length_change(problem_IB, lengths_IB, correct_IB, window=2)
    assert out["problems"] == 2 and out["change"] == pytest.approx(1.0)
    assert out["se"] == pytest.approx(np.std([0.0, 2.0], ddof=1) / np.sqrt(2))
    unpaired_only = np.isin(problem_IB, [2, 3])
    assert grpo.paired_length_change(problem_IB, np.where(unpaired_only, 1, lengths_IB), correct_IB, 2) == out
    assert np.isnan(grpo.paired_length_change(problem_IB, lengths_IB, correct_IB, window=1)["change"])


def test_sample_stats_from_the_sampler_logprobs():
    """Entropy −mean log π and k3 KL over response tokens only; slots after the stop token (mask 0) are ignored."""
    batch = {"mask_BN": jnp.array([[1.0, 1.0, 0.0]]), "old_logp_BN": jnp.log(jnp.array([[0.5, 0.25, 1.0]]))}
    stats = grpo.sample_stats(batch, ref_logp_BN=jnp.log(jnp.array([[0.25, 0.5, 0.01]])))
    assert float(stats["entropy"]) == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-6)
    # r = 0.5 and 2: k3 = (−0.5 + log 2) and (1 − log 2), mean 0.25.
    assert float(stats["kl"]) == pytest.approx(0.25, rel=1e-6)
    assert "kl" not in grpo.sample_stats(batch)


# ---------------------------------------------------------------------------------------------------------- KL


def test_kl_estimator_values():
    logp, ref = jnp.log(jnp.array([0.5, 0.2])), jnp.log(jnp.array([0.25, 0.4]))
    # r = ref / π = 0.5, 2: k1 = −log r, k2 = ½ log² r, k3 = r − 1 − log r.
    np.testing.assert_allclose(kl.k1(logp, ref), [math.log(2), -math.log(2)], rtol=1e-6)
    np.testing.assert_allclose(kl.k2(logp, ref), [0.5 * math.log(2) ** 2] * 2, rtol=1e-6)
    np.testing.assert_allclose(kl.k3(logp, ref), [-0.5 + math.log(2), 1 - math.log(2)], rtol=1e-6)
    assert float(kl.k3(logp, logp).max()) == 0.0


def test_k1_and_k3_are_unbiased_k2_is_not():
    """Expected over x ~ π, k1 and k3 equal KL(π‖ref) exactly (k3 is also ≥ 0 per sample); k2 is only close."""
    p = jnp.array([0.6, 0.3, 0.1])
    q = jnp.array([0.2, 0.5, 0.3])
    exact = float(jnp.sum(p * jnp.log(p / q)))
    logp, ref = jnp.log(p), jnp.log(q)
    assert float(jnp.sum(p * kl.k1(logp, ref))) == pytest.approx(exact, rel=1e-5)
    assert float(jnp.sum(p * kl.k3(logp, ref))) == pytest.approx(exact, rel=1e-5)
    assert float(jnp.sum(p * kl.k2(logp, ref))) != pytest.approx(exact, rel=1e-2)
    assert (kl.k3(logp, ref) >= 0).all() and (kl.k1(logp, ref) < 0).any()


# ------------------------------------------------------------------------------------------------------- the loss

CFG = ModelConfig(vocab_size=7, block_size=10, n_layer=1, n_head=2, n_embd=16).validate()


def loss_batch(logp_shift: float = 0.0) -> tuple[model.Params, dict]:
    """Two groups of 2 rows with lengths 3, 1, 2, 4; old log-probs = current ones minus `logp_shift` (ratio e^shift)."""
    params = model.init(CFG, jax.random.key(0))
    prompt_BP, lens_B = rollout.pad_prompts([[2, 3], [2, 3], [4], [4]], 2, 0)
    tokens_BN, lengths_B = rollout.pad_responses([[3, 4, 1], [1], [5, 1], [2, 2, 3, 1]], 4, 0)
    mask_BN = rollout.response_mask(jnp.asarray(lengths_B), 4)
    logp_BN, _ = rollout.token_logprobs(params, prompt_BP, lens_B, tokens_BN, CFG)
    batch = {"prompt_BP": prompt_BP, "prompt_lens_B": lens_B, "tokens_BN": tokens_BN, "mask_BN": mask_BN,
             "old_logp_BN": (logp_BN - logp_shift) * mask_BN, "adv_B": jnp.array([1.0, -1.0, 2.0, -2.0]),
             "ref_logp_BN": logp_BN * mask_BN}
    return params, batch


@pytest.mark.parametrize("loss,denominators", [
    ("grpo", [4 * 3, 4 * 1, 4 * 2, 4 * 4]),  # B · length_b
    ("dapo", [10] * 4),  # all tokens in the batch
    ("dr_grpo", [4 * 4] * 4),  # B · N
])
def test_each_aggregation_mode_divides_by_its_denominator(loss, denominators):
    """At ratio 1 each token contributes −A_b / denominator: the loss is −Σ_b A_b·len_b / denominator_b."""
    gc = grpo.GRPOConfig(loss=loss, beta=0.0, group_size=2)
    params, batch = loss_batch()
    batch["weight_BN"] = rollout.aggregation_weights(batch["mask_BN"], grpo.LOSSES[loss])
    value, _ = grpo.policy_loss(CFG, gc)(params, batch, jax.random.key(0))
    lengths, adv = np.array([3, 1, 2, 4]), np.array([1.0, -1.0, 2.0, -2.0])
    np.testing.assert_allclose(float(value), -np.sum(adv * lengths / np.array(denominators)), rtol=1e-5)


def test_dr_grpo_defaults_to_unscaled_advantages():
    assert grpo.GRPOConfig(loss="dr_grpo").reward_scaling == "none"
    assert grpo.GRPOConfig(loss="grpo").reward_scaling == "group"
    assert grpo.GRPOConfig(loss="dr_grpo", scale_rewards="group").reward_scaling == "group"


def test_clipping_is_asymmetric_and_stops_the_gradient():
    """With ratio e^0.25 ≈ 1.28: inside ε_high = 0.3 every token has gradient; with ε_high = 0.2 the positive-advantage
    tokens are clipped (zero gradient, counted in clip_frac) and the negative ones are not (min keeps ρA)."""
    params, batch = loss_batch(logp_shift=0.25)
    mask = batch["mask_BN"]
    for eps_high, clipped_rows in ((0.3, []), (0.2, [0, 2])):
        gc = grpo.GRPOConfig(loss="dapo", beta=0.0, group_size=2, eps_high=eps_high)
        batch["weight_BN"] = rollout.aggregation_weights(mask, "token_mean")

        def per_row(logp_shift_B, gc=gc):
            shifted = dict(batch, old_logp_BN=batch["old_logp_BN"] - logp_shift_B[:, None] * mask)
            return grpo.policy_loss(CFG, gc)(params, shifted, jax.random.key(0))[0]

        grad_B = jax.grad(per_row)(jnp.zeros(4))  # d loss / d(old log-prob shift) ∝ the ratio's gradient
        assert [b for b in range(4) if float(grad_B[b]) == 0.0] == clipped_rows
        diag = grpo.diagnostics(params, batch, cfg=CFG, gc=gc)
        expected = sum(float(mask[b].sum()) for b in clipped_rows) / float(mask.sum())
        assert float(diag["clip_frac"]) == pytest.approx(expected)
        assert float(diag["ratio"]) == pytest.approx(math.exp(0.25), rel=1e-5)


def test_beta_adds_k3_and_zero_beta_needs_no_reference():
    params, batch = loss_batch()
    batch["weight_BN"] = rollout.aggregation_weights(batch["mask_BN"], "token_mean")
    batch["ref_logp_BN"] = batch["ref_logp_BN"] - 0.5 * batch["mask_BN"]  # ref = π·e^-0.5 per token
    no_ref = {k: v for k, v in batch.items() if k != "ref_logp_BN"}
    base, _ = grpo.policy_loss(CFG, grpo.GRPOConfig(loss="dapo", beta=0.0, group_size=2))(params, no_ref, None)
    with_kl, _ = grpo.policy_loss(CFG, grpo.GRPOConfig(loss="dapo", beta=0.1, group_size=2))(params, batch, None)
    k3 = math.exp(-0.5) - 1 + 0.5
    assert float(with_kl - base) == pytest.approx(0.1 * k3, rel=1e-4)


def test_rft_weights_keep_only_correct_samples():
    params, batch = loss_batch()
    rollout_ = {"prompt_BP": batch["prompt_BP"], "prompt_lens_B": batch["prompt_lens_B"],
                "tokens_BN": batch["tokens_BN"], "logp_BN": batch["old_logp_BN"], "mask_BN": batch["mask_BN"]}
    made = grpo.make_batch(rollout_, np.array([1, 0, 0, 1], np.float32), grpo.GRPOConfig(loss="rft", group_size=2),
                           None)
    np.testing.assert_allclose(made["weight_BN"].sum(-1), [3 / 7, 0, 0, 4 / 7], rtol=1e-6)  # 7 kept tokens


@pytest.mark.parametrize("loss,beta,kept", [
    ("grpo", 0.0, [0, 1]),  # group 2's rewards are equal: advantage 0
    ("dr_grpo", 0.0, [0, 1]),
    ("rft", 0.0, [0, 2, 3]),  # the correct samples
    ("grpo", 0.1, [0, 1, 2, 3]),  # the KL term acts on every row
])
def test_contributing_rows_keep_the_gradient(loss, beta, kept):
    """Training on the contributing rows (padded with dropped ones) gives the full batch's loss gradient, ratio ≠ 1."""
    params, batch = loss_batch(logp_shift=0.1)
    gc = grpo.GRPOConfig(loss=loss, beta=beta, group_size=2)
    rewards = np.array([1, 0, 1, 1], np.float32)
    batch["adv_B"] = grpo.group_advantages(jnp.asarray(rewards), 2, gc.reward_scaling)
    mask_BN = batch["mask_BN"] * (rewards[:, None] > 0) if loss == "rft" else batch["mask_BN"]
    batch["weight_BN"] = rollout.aggregation_weights(mask_BN, grpo.LOSSES[loss])
    idx = grpo.contributing_rows(batch, gc, bucket=1)
    assert sorted(idx.tolist()) == kept
    # Padded to the bucket (RL losses: rounded up to whole groups of 2), never beyond B.
    assert len(grpo.contributing_rows(batch, gc, bucket=3)) == (3 if loss == "rft" else 4)
    loss_fn = grpo.policy_loss(CFG, gc)
    full = jax.grad(lambda p: loss_fn(p, batch, None)[0])(params)
    part = jax.grad(lambda p: loss_fn(p, {k: v[idx] for k, v in batch.items()}, None)[0])(params)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(full)) > 1e-3
    for g_full, g_part in zip(jax.tree.leaves(full), jax.tree.leaves(part), strict=True):
        np.testing.assert_allclose(g_part, g_full, atol=1e-7)


def test_train_stops_at_the_time_budget():
    """The budget is checked before each iteration: a spent budget returns the starting params and no history."""
    task = tasks.make_task("addition")
    cfg = ModelConfig(vocab_size=tasks.VOCAB_SIZE, block_size=12, n_layer=1, n_head=2, n_embd=16).validate()
    params = model.init(cfg, jax.random.key(0))
    out, history = grpo.train(params, ref_params=params, cfg=cfg, gc=grpo.GRPOConfig(), tc=TrainConfig(),
                              task=task, problems=task.problems[:64], key=jax.random.key(0), max_iters=5,
                              time_budget_s=0.0)
    assert history == []
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), out, params))


@pytest.mark.parametrize("bad,match", [(dict(kl_every=0), "kl_every"), (dict(row_bucket=-1), "row_bucket")])
def test_train_rejects_bad_arguments_before_any_work(bad, match):
    task = tasks.make_task("addition")
    cfg = ModelConfig(vocab_size=tasks.VOCAB_SIZE, block_size=10, n_layer=1, n_head=2, n_embd=16).validate()
    params = model.init(cfg, jax.random.key(0))
    with pytest.raises(UserError, match=match):
        grpo.train(params, ref_params=params, cfg=cfg, gc=grpo.GRPOConfig(), tc=TrainConfig(), task=task,
                   problems=task.problems[:64], key=jax.random.key(0), max_iters=1, **bad)


@pytest.mark.parametrize("beta,with_kl", [(0.0, [1, 2, 4]), (0.04, [1, 2, 3, 4])])
def test_kl_is_logged_every_kl_every_iterations_at_beta_zero(beta, with_kl):
    """At β = 0 the reference forward pass (KL logging only) runs on the first and every kl_every-th iteration."""
    task = tasks.make_task("addition")
    cfg = ModelConfig(vocab_size=tasks.VOCAB_SIZE, block_size=10, n_layer=1, n_head=2, n_embd=16).validate()
    params = model.init(cfg, jax.random.key(0))
    gc = grpo.GRPOConfig(group_size=2, prompts_per_iter=4, beta=beta)
    _, history = grpo.train(params, ref_params=params, cfg=cfg, gc=gc, tc=TrainConfig(warmup_iters=1), task=task,
                            problems=task.problems[:64], key=jax.random.key(0), max_iters=4, kl_every=2,
                            row_bucket=2)
    assert [h["iter"] for h in history if "kl" in h] == with_kl
    assert all(h["train_rows"] % 2 == 0 and 2 <= h["train_rows"] <= 8 for h in history)


def test_config_validation():
    with pytest.raises(UserError, match="loss"):
        grpo.GRPOConfig(loss="ppo").validate()
    with pytest.raises(UserError, match="group_size"):
        grpo.GRPOConfig(group_size=1).validate()
    with pytest.raises(UserError, match="scale_rewards"):
        grpo.GRPOConfig(scale_rewards="std").validate()


@pytest.mark.slow
def test_experiment_smoke(tmp_path):
    """The --small run end to end (SFT, GRPO, Dr. GRPO, RFT, plots) writes every stable key (< 1 min when quiet)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "experiments.grpo", "--small", f"--workdir={tmp_path}"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("sft_greedy_acc", "grpo_greedy_acc", "grpo_pass1", "grpo_pass8", "sft_pass8", "dr_grpo_greedy_acc",
                "rft_greedy_acc", "wall_time_s"):
        assert summary[key] is not None, key
    assert summary["rft_sampled_tokens"] >= summary["grpo_sampled_tokens"]  # the baseline gets at least the budget
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_experiment_rejects_bad_flags_before_training(tmp_path):
    """A bad flag is one `error:` line and a non-zero exit, before SFT starts or the workdir is written."""
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.grpo", "--kl_every=0", f"--workdir={workdir}"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == "error: --kl_every=0 must be ≥ 1"
    assert not workdir.exists()
