"""GRPO (Shao et al. 2024, DeepSeekMath) with the Dr. GRPO (Liu et al. 2025) and DAPO (Yu et al. 2025) variants.

No value model: each prompt is answered G times and a completion's advantage is its reward relative to its group,
(r − mean_G) / (std_G + eps), given to every one of its tokens. The policy loss is PPO's clipped surrogate with
separate low / high clip ranges (DAPO's ε_high > ε_low lets rare tokens grow), plus β·k3 KL to the reference
policy per token (β = 0 skips the reference). How token losses are summed is the `loss` option:

  grpo     mean over each sequence's tokens, then over sequences (long wrong answers are penalised less per token);
  dr_grpo  sum over tokens / (B · N_max), and no std scaling of advantages: removes both length and difficulty bias;
  dapo     mean over all tokens of the batch;
  rft      rejection-sampling fine-tuning: NLL of the correct samples (token mean), the baseline that shares every
           other piece (sampling, budget accounting, evaluation) with the RL losses.

`train` runs the loop: sample → verify → advantages → `num_updates` steps of the shared `make_train_step` on the
same rollouts (ratios against the sampling policy's log-probs). Entropy and KL to the reference are estimated from
the sampler's own log-probs, so logging costs no extra forward pass; the clip fraction needs one, and is only
measured when μ > 1 (with μ = 1 every ratio is exactly 1).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import model
from llmjax.config import ModelConfig, TrainConfig
from llmjax.errors import UserError
from llmjax.generate import SamplingConfig
from llmjax.optim import make_optimizer
from llmjax.rl import kl, tasks
from llmjax.rl.rollout import (
    add_micro_axis,
    aggregation_weights,
    nll_loss,
    pad_prompts,
    sample_groups,
    token_logprobs,
)
from llmjax.train import Batch, LossFn, State, make_train_step

LOSSES = {"grpo": "seq_mean", "dr_grpo": "constant", "dapo": "token_mean", "rft": "token_mean"}


@dataclass(frozen=True)
class GRPOConfig:
    group_size: int = 8  # G completions per prompt
    prompts_per_iter: int = 32  # prompts per rollout batch (B·G rows)
    temperature: float = 1.0
    beta: float = 0.04  # k3 KL coefficient (DeepSeekMath); 0 skips the reference model
    eps_low: float = 0.2
    eps_high: float = 0.2  # DAPO: 0.28
    loss: str = "grpo"  # grpo | dr_grpo | dapo | rft
    scale_rewards: str | None = None  # group | batch | none; None: "none" for dr_grpo, else "group"
    adv_eps: float = 1e-4
    num_updates: int = 1  # optimizer steps on each rollout batch (GRPO's μ)

    @property
    def reward_scaling(self) -> str:
        if self.scale_rewards is not None:
            return self.scale_rewards
        return "none" if self.loss == "dr_grpo" else "group"

    def validate(self) -> GRPOConfig:
        if self.loss not in LOSSES:
            raise UserError(f"loss={self.loss!r} is not one of {', '.join(LOSSES)}")
        if self.reward_scaling not in ("group", "batch", "none"):
            raise UserError(f"scale_rewards={self.scale_rewards!r} is not one of group, batch, none")
        if self.group_size < 2:
            raise UserError(f"group_size={self.group_size} must be ≥ 2: advantages are relative to the group")
        if self.prompts_per_iter < 1 or self.num_updates < 1:
            raise UserError("prompts_per_iter and num_updates must be positive")
        if self.temperature <= 0:
            raise UserError(f"temperature={self.temperature} must be > 0: RL samples, greedy decoding has no ratio")
        if self.beta < 0 or not 0 <= self.eps_low < 1 or self.eps_high < 0:
            raise UserError("need beta ≥ 0, 0 ≤ eps_low < 1 and eps_high ≥ 0")
        return self


def group_advantages(rewards_B: jax.Array, group_size: int, scale: str, eps: float = 1e-4) -> jax.Array:
    """(r − group mean) / (std + eps), rows b·G .. b·G+G-1 forming a group.

    std (unbiased, as TRL's) is the group's for `group`, the whole batch's for `batch`; `none` keeps r − mean.
    A group whose rewards are all equal gets advantage 0: it teaches nothing.
    """
    r_BG = jnp.reshape(rewards_B, (-1, group_size)).astype(jnp.float32)
    centred_BG = r_BG - r_BG.mean(axis=1, keepdims=True)
    if scale == "group":
        centred_BG = centred_BG / (r_BG.std(axis=1, ddof=1, keepdims=True) + eps)
    elif scale == "batch":
        centred_BG = centred_BG / (r_BG.std(ddof=1) + eps)
    return centred_BG.reshape(-1)


def _clipped(ratio_BN: jax.Array, adv_B1: jax.Array, gc: GRPOConfig) -> tuple[jax.Array, jax.Array]:
    """PPO's pessimistic surrogate min(ρA, clip(ρ)A) per token, and where the clipped branch binds (no gradient)."""
    surrogate_BN = jnp.minimum(ratio_BN * adv_B1, jnp.clip(ratio_BN, 1 - gc.eps_low, 1 + gc.eps_high) * adv_B1)
    clipped_BN = ((adv_B1 > 0) & (ratio_BN > 1 + gc.eps_high)) | ((adv_B1 < 0) & (ratio_BN < 1 - gc.eps_low))
    return surrogate_BN, clipped_BN


def policy_loss(cfg: ModelConfig, gc: GRPOConfig) -> LossFn:
    """Σ w·(−min(ρA, clip(ρ)A) + β·k3) over response tokens; batch from `make_batch`."""
    if gc.loss == "rft":
        return nll_loss(cfg)

    def loss_fn(params: model.Params, batch: Batch, key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        logp_BN, _ = token_logprobs(
            params, batch["prompt_BP"], batch["prompt_lens_B"], batch["tokens_BN"], cfg, gc.temperature, gc.group_size
        )
        ratio_BN = jnp.exp(logp_BN - batch["old_logp_BN"])
        surrogate_BN, _ = _clipped(ratio_BN, batch["adv_B"][:, None], gc)
        loss_BN = -surrogate_BN
        if gc.beta > 0:
            loss_BN = loss_BN + gc.beta * kl.k3(logp_BN, batch["ref_logp_BN"])
        return jnp.sum(batch["weight_BN"] * loss_BN), {}

    return loss_fn


@functools.partial(jax.jit, static_argnames=("cfg", "gc"))
def diagnostics(params: model.Params, batch: Batch, *, cfg: ModelConfig, gc: GRPOConfig) -> dict[str, jax.Array]:
    """Token means over the responses: k3 KL to the reference (if given), clip fraction, ratio and entropy."""
    logp_BN, entropy_BN = token_logprobs(
        params, batch["prompt_BP"], batch["prompt_lens_B"], batch["tokens_BN"], cfg, gc.temperature, gc.group_size
    )
    mask_BN = batch["mask_BN"]

    def mean(x_BN: jax.Array) -> jax.Array:
        return jnp.sum(x_BN * mask_BN) / jnp.maximum(mask_BN.sum(), 1.0)

    ratio_BN = jnp.exp(logp_BN - batch["old_logp_BN"])
    _, clipped_BN = _clipped(ratio_BN, batch["adv_B"][:, None], gc)
    out = {"entropy": mean(entropy_BN), "clip_frac": mean(clipped_BN), "ratio": mean(ratio_BN)}
    if "ref_logp_BN" in batch:
        out["kl"] = mean(kl.k3(logp_BN, batch["ref_logp_BN"]))
    return out


@jax.jit
def sample_stats(batch: Batch, ref_logp_BN: jax.Array | None = None) -> dict[str, jax.Array]:
    """Free estimates from the sampler's own log-probs: entropy −E[log π], and k3 KL per token to the reference
    when its log-probs are given (at β = 0 they are computed only on KL-logging iterations, outside the batch).

    The responses were drawn from the sampling policy, so these are the Monte Carlo estimates at the policy that
    produced the batch (before its update), at no extra forward pass.
    """
    mask_BN = batch["mask_BN"]
    n = jnp.maximum(mask_BN.sum(), 1.0)
    out = {"entropy": -jnp.sum(batch["old_logp_BN"] * mask_BN) / n}
    if ref_logp_BN is not None:
        out["kl"] = jnp.sum(kl.k3(batch["old_logp_BN"], ref_logp_BN) * mask_BN) / n
    return out


_ref_logprobs = jax.jit(token_logprobs, static_argnames=("cfg", "temperature", "group_size"))


def make_batch(rollout: dict, rewards_B: np.ndarray, gc: GRPOConfig, ref_logp_BN: jax.Array | None) -> Batch:
    """The loss's inputs for one rollout batch: advantages, aggregation weights (RFT: correct samples only)."""
    mask_BN = rollout["mask_BN"]
    if gc.loss == "rft":
        mask_BN = mask_BN * (jnp.asarray(rewards_B) > 0)[:, None]
    batch = {
        "prompt_BP": rollout["prompt_BP"], "prompt_lens_B": rollout["prompt_lens_B"],
        "tokens_BN": rollout["tokens_BN"], "old_logp_BN": rollout["logp_BN"], "mask_BN": rollout["mask_BN"],
        "adv_B": group_advantages(jnp.asarray(rewards_B), gc.group_size, gc.reward_scaling, gc.adv_eps),
        "weight_BN": aggregation_weights(mask_BN, LOSSES[gc.loss]),
    }
    if ref_logp_BN is not None:
        batch["ref_logp_BN"] = ref_logp_BN
    return batch


def contributing_rows(batch: Batch, gc: GRPOConfig, bucket: int) -> np.ndarray:
    """Indices of a row subset whose loss gradient equals the whole batch's, padded to a multiple of `bucket` rows.

    At β = 0 a row with advantage 0 (its group's rewards all equal) or no weight (RFT: an incorrect sample) adds 0
    to the loss for any ratio, so dropping it changes nothing but the cost. The weights were computed on the full
    batch, so every aggregation keeps its denominator. Padding with dropped rows (they contribute 0 too) keeps the
    train step to at most B / bucket compiled shapes. The RL losses run each prompt once per group
    (`token_logprobs` with group_size), so for them whole groups are kept, in order, and `bucket` is rounded up to
    whole groups.
    """
    weight_B = np.asarray(batch["weight_BN"]).any(1)
    if gc.beta > 0:
        keep_B = weight_B | np.asarray(batch["mask_BN"]).any(1)  # the KL term acts on every response
    elif gc.loss == "rft":
        keep_B = weight_B
    else:
        keep_B = weight_B & (np.asarray(batch["adv_B"]) != 0)
    unit = 1 if gc.loss == "rft" else gc.group_size  # rows per indivisible unit
    keep_U = keep_B.reshape(-1, unit).any(1)
    kept, dropped = np.flatnonzero(keep_U), np.flatnonzero(~keep_U)
    bucket_units = -(-bucket // unit)
    size = min(len(keep_U), max(bucket_units, -(-len(kept) // bucket_units) * bucket_units))
    units = np.concatenate([kept, dropped[: size - len(kept)]])
    return (units[:, None] * unit + np.arange(unit)).reshape(-1)


def rollout_stats(
    rewards_B: np.ndarray, lengths_B: np.ndarray, reference_lens_B: np.ndarray, group_size: int
) -> dict[str, float]:
    """Reward, the fraction of groups with zero reward variance (no learning signal), lengths by correctness.

    `len_incorrect_excess` is how much longer a wrong answer is than its problem's reference answer (both with
    EOS): the raw length of wrong answers also moves with which problems are still wrong (on addition, a 3-digit
    sum's answers are longer), the excess only with how the model answers.
    """
    correct_B = rewards_B > 0
    r_BG = rewards_B.reshape(-1, group_size)

    def mean(x_B: np.ndarray, where_B: np.ndarray) -> float:
        return float(x_B[where_B].mean()) if where_B.any() else float("nan")

    return {
        "reward": float(rewards_B.mean()),
        "zero_var_frac": float(np.mean(r_BG.max(1) == r_BG.min(1))),
        "len_correct": mean(lengths_B, correct_B),
        "len_incorrect": mean(lengths_B, ~correct_B),
        "len_incorrect_excess": mean(lengths_B - reference_lens_B, ~correct_B),
    }


def paired_length_change(
    problem_IB: np.ndarray, lengths_IB: np.ndarray, correct_IB: np.ndarray, window: int
) -> dict[str, float]:
    """How long wrong answers get on the same problems: per problem, the mean length of its wrong answers over the
    last `window` iterations minus over the first `window`, averaged over the problems wrong in both windows.

    The mean over all wrong answers also moves with which problems are still wrong (late in training, the hard
    ones), so it cannot tell whether the policy itself answers longer when it is wrong; this can.
    Returns {"change", "se" (its standard error over problems), "problems"}; NaN when fewer than 2 problems.
    """
    n = int(problem_IB.max()) + 1

    def per_problem(rows: slice) -> tuple[np.ndarray, np.ndarray]:
        wrong = ~correct_IB[rows].ravel()
        ids = problem_IB[rows].ravel()[wrong]
        return np.bincount(ids, lengths_IB[rows].ravel()[wrong], n), np.bincount(ids, minlength=n)

    (sum_first, n_first), (sum_last, n_last) = per_problem(slice(0, window)), per_problem(slice(-window, None))
    both = (n_first > 0) & (n_last > 0)
    diff_X = sum_last[both] / n_last[both] - sum_first[both] / n_first[both]
    if len(diff_X) < 2:
        return {"change": float("nan"), "se": float("nan"), "problems": len(diff_X)}
    return {"change": float(diff_X.mean()), "se": float(diff_X.std(ddof=1) / np.sqrt(len(diff_X))),
            "problems": len(diff_X)}


def _chunks(problems: Sequence[tasks.Problem], size: int) -> list[list[tasks.Problem]]:
    """Fixed-size chunks (the last one padded by repeating its final problem) so every call reuses one compile."""
    out = [list(problems[i: i + size]) for i in range(0, len(problems), size)]
    out[-1] += [out[-1][-1]] * (size - len(out[-1]))
    return out


def evaluate(
    params: model.Params,
    problems: Sequence[tasks.Problem],
    task: tasks.Task,
    key: jax.Array,
    *,
    cfg: ModelConfig,
    n_samples: int = 8,
    chunk: int = 32,
    sampled: bool = True,
) -> dict[str, float]:
    """Greedy accuracy; with `sampled`, also pass@1 (temperature 1) and pass@n_samples over n_samples draws."""
    greedy, draws = [], []
    for i, chunk_problems in enumerate(_chunks(problems, chunk)):
        prompt_BP, lens_B = pad_prompts([tasks.encode(p.prompt) for p in chunk_problems], task.prompt_len, tasks.PAD)
        runs = [(1, 0.0, greedy)] + ([(n_samples, 1.0, draws)] if sampled else [])
        for group, temperature, out in runs:
            sc = SamplingConfig(temperature=temperature, stop_token=tasks.EOS, pad_id=tasks.PAD)
            rollout = sample_groups(params, prompt_BP, lens_B, jax.random.fold_in(key, i), cfg=cfg,
                                    group_size=group, max_new_tokens=task.max_new_tokens, sc=sc)
            rows = [p for p in chunk_problems for _ in range(group)]
            out.append(tasks.reward_batch(task, rows, np.asarray(rollout["tokens_BN"])).reshape(chunk, group))
    n = len(problems)
    result = {"greedy_acc": float(np.concatenate(greedy)[:n].mean())}
    if sampled:
        correct_XS = np.concatenate(draws)[:n] > 0
        result.update(pass1=float(correct_XS.mean()), pass_n=float(correct_XS.any(1).mean()))
    return result


def new_state(params: model.Params, optimizer) -> State:
    """A train state starting from given params (copied: the step donates its state, the caller keeps theirs)."""
    params = jax.tree.map(jnp.copy, params)
    return {"step": jnp.int32(0), "params": params, "opt_state": optimizer.init(params)}


def train(
    params: model.Params,
    *,
    ref_params: model.Params | None,
    cfg: ModelConfig,
    gc: GRPOConfig,
    tc: TrainConfig,
    task: tasks.Task,
    problems: Sequence[tasks.Problem],
    key: jax.Array,
    max_iters: int,
    token_budget: int | None = None,
    time_budget_s: float | None = None,
    kl_every: int = 1,
    row_bucket: int | None = None,
    on_iter: Callable[[int, model.Params, dict[str, float], dict[str, np.ndarray]], None] | None = None,
) -> tuple[model.Params, list[dict[str, float]]]:
    """Run `max_iters` iterations, or fewer once `token_budget` response tokens have been sampled or `time_budget_s`
    seconds have passed (checked between iterations): (params, history).

    Iteration i draws its prompts from `problems` as a pure function of (tc.seed, i). `ref_params` is needed when
    β > 0 and otherwise only used to log KL, on the first and every `kl_every`-th iteration (it costs a forward
    pass). The train step sees only the rows that carry gradient (`contributing_rows`), padded to
    a multiple of `row_bucket` (None: no filtering). `on_iter(i, params, record, rows)` may add entries to the record;
    rows holds each sampled row's problem index (into `problems`), length and reward.
    """
    if gc.beta > 0 and ref_params is None:
        raise UserError("beta > 0 needs the reference policy's params")
    if kl_every < 1:
        raise UserError(f"kl_every={kl_every} must be ≥ 1: KL is logged every kl_every-th iteration")
    if row_bucket is not None and row_bucket < 1:
        raise UserError(f"row_bucket={row_bucket} must be ≥ 1 (or 0 on the command line: train on every row)")
    optimizer = make_optimizer(tc, model.param_axes(cfg))
    step_fn = jax.jit(make_train_step(policy_loss(cfg, gc), optimizer), donate_argnums=0)
    state = new_state(params, optimizer)
    prompt_XP, lens_X = pad_prompts([tasks.encode(p.prompt) for p in problems], task.prompt_len, tasks.PAD)
    reference_lens_X = np.array([len(tasks.encode(p.solution)) + 1 for p in problems])  # + EOS
    sc = SamplingConfig(temperature=gc.temperature, stop_token=tasks.EOS, pad_id=tasks.PAD)
    history: list[dict[str, float]] = []
    sampled_tokens = 0
    start = time.perf_counter()
    for it in range(max_iters):
        if token_budget is not None and sampled_tokens >= token_budget:
            break
        if time_budget_s is not None and time.perf_counter() - start >= time_budget_s:
            break
        rng = np.random.default_rng([tc.seed, it])
        idx = rng.choice(len(problems), gc.prompts_per_iter, replace=False)
        it_key = jax.random.fold_in(key, it)
        rollout = sample_groups(state["params"], prompt_XP[idx], lens_X[idx], it_key, cfg=cfg,
                                group_size=gc.group_size, max_new_tokens=task.max_new_tokens, sc=sc)
        problem_B = np.repeat(idx, gc.group_size)  # sample_groups' layout: G consecutive rows per prompt
        tokens_BN, lengths_B = np.asarray(rollout["tokens_BN"]), np.asarray(rollout["lengths_B"])
        rewards_B = tasks.reward_batch(task, [problems[i] for i in problem_B], tokens_BN)
        ref_logp_BN = None
        if ref_params is not None and (gc.beta > 0 or it == 0 or (it + 1) % kl_every == 0):
            ref_logp_BN = _ref_logprobs(ref_params, rollout["prompt_BP"], rollout["prompt_lens_B"],
                                        rollout["tokens_BN"], cfg=cfg, temperature=gc.temperature,
                                        group_size=gc.group_size)[0]
        # At β = 0 the loss never sees the reference: one batch structure, one compiled step.
        batch = make_batch(rollout, rewards_B, gc, ref_logp_BN if gc.beta > 0 else None)
        # Groups with equal rewards carry no gradient (ever more of them as accuracy rises): train on the rest.
        train_batch = batch
        if row_bucket is not None:
            train_idx = contributing_rows(batch, gc, row_bucket)
            train_batch = {k: v[train_idx] for k, v in batch.items()}
        micro = add_micro_axis(train_batch)
        clip = {}
        for update in range(gc.num_updates):
            if update == gc.num_updates - 1 and update > 0:  # μ = 1 is on-policy: the ratio is 1, nothing clips
                clip = {k: float(v) for k, v in diagnostics(state["params"], batch, cfg=cfg, gc=gc).items()
                        if k in ("clip_frac", "ratio")}
            state, metrics = step_fn(state, micro, it_key)
        sampled_tokens += int(lengths_B.sum())
        record = {
            "iter": it + 1, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
            **rollout_stats(rewards_B, lengths_B, reference_lens_X[problem_B], gc.group_size),
            "clip_frac": 0.0, "ratio": 1.0, **clip,
            **{k: float(v) for k, v in sample_stats(batch, ref_logp_BN).items()},
            "sampled_tokens": sampled_tokens, "train_rows": len(train_batch["adv_B"]),
            "time_s": time.perf_counter() - start,
        }
        if on_iter is not None:
            on_iter(it + 1, state["params"], record,
                    {"problem_B": problem_B, "lengths_B": lengths_B, "rewards_B": rewards_B})
        history.append(record)
    return state["params"], history
