"""PPO for RLHF (Ziegler et al. 2019; Ouyang et al. 2022), as a loss plugged into the shared train step.

Per iteration: sample one response per prompt from the policy; score it (the normalised reward model at its last
token, or the true reward); per-token rewards are −β·KL(π ‖ π_ref) on every response token (k1 = log π − log π_ref,
or k3 by option) plus the score on the last one; a value model (its own trunk, started from the reward model's)
gives V(s_t); GAE(γ, λ) gives advantages, whitened over the batch. Then `epochs` passes over `minibatches`
shuffled minibatches, each one optimizer step of the clipped surrogate min(ρA, clip(ρ, 1 ± ε)A) plus the clipped
value loss ½·max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²). An adaptive controller may move β towards a
target sequence KL (Ziegler's proportional rule with a horizon).

Token losses are summed with per-token weights (`aggregation`): token_mean (every response token of the minibatch
counts once), seq_mean (mean over each response, then over responses) or seq_sum (sum over each response's tokens,
mean over responses). Weights are computed on the whole minibatch, so splitting it into `n_micro` micro-batches
gives the same gradient.

Adam's ε placement is an option: `torch` adds ε to √v̂ (bias-corrected), `tf` adds it to √v before the bias
correction (TF1 / OpenAI baselines, which Ziegler's code used): early in training that ε is effectively larger.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llmjax import model
from llmjax.config import ModelConfig
from llmjax.errors import UserError
from llmjax.generate import SamplingConfig
from llmjax.rl import kl, reward_model
from llmjax.rl.rollout import add_micro_axis, aggregation_weights, sample_groups, token_logprobs
from llmjax.train import Batch, LossFn, State, make_train_step

AGGREGATIONS = ("token_mean", "seq_mean", "seq_sum")


@dataclass(frozen=True)
class PPOConfig:
    kl_coef: float = 0.05  # β: initial value when adaptive
    kl_estimator: str = "k1"  # k1 | k3, the per-token KL penalty in the reward
    adaptive_kl: bool = False
    target_kl: float = 5.0  # nats per sequence
    kl_horizon: int = 500  # samples; the controller moves β by at most ±20% per horizon
    gamma: float = 1.0
    lam: float = 0.95
    clip_ratio: float = 0.2
    clip_value: float = 0.2
    vf_coef: float = 0.5
    entropy_coef: float = 0.0
    whiten_rewards: bool = False  # scale the per-token rewards by their std over the batch (no shift)
    whiten_advantages: bool = True
    epochs: int = 4
    minibatches: int = 4
    n_micro: int = 1
    rollouts_per_iter: int = 64
    temperature: float = 1.0
    aggregation: str = "token_mean"
    learning_rate: float = 1e-4
    warmup_iters: int = 5  # iterations of linear warmup: a fresh Adam's first full-size steps jolt the policy
    adam_eps: float = 1e-5
    adam_eps_placement: str = "torch"  # torch | tf
    grad_clip: float = 1.0

    def validate(self) -> PPOConfig:
        if self.kl_estimator not in ("k1", "k3"):
            raise UserError(f"kl_estimator={self.kl_estimator!r} is not one of k1, k3")
        if self.aggregation not in AGGREGATIONS:
            raise UserError(f"aggregation={self.aggregation!r} is not one of {', '.join(AGGREGATIONS)}")
        if self.adam_eps_placement not in ("torch", "tf"):
            raise UserError(f"adam_eps_placement={self.adam_eps_placement!r} is not one of torch, tf")
        if self.kl_coef < 0 or self.target_kl <= 0 or self.kl_horizon < 1:
            raise UserError("need kl_coef ≥ 0, target_kl > 0 and kl_horizon ≥ 1")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise UserError("gamma and lam must be in [0, 1]")
        if self.rollouts_per_iter % (self.minibatches * self.n_micro):
            raise UserError(
                f"rollouts_per_iter={self.rollouts_per_iter} must divide into minibatches × n_micro "
                f"= {self.minibatches * self.n_micro}"
            )
        if self.temperature <= 0 or self.epochs < 1 or self.learning_rate <= 0:
            raise UserError("need temperature > 0, epochs ≥ 1 and learning_rate > 0")
        return self


# ---------------------------------------------------------------------------------------------- pure pieces


def loss_weights(mask_BN: jax.Array, mode: str, n_micro: int = 1) -> jax.Array:
    """Per-token weights of an aggregation mode (see the module docstring), scaled for `n_micro` micro-batches."""
    if mode == "seq_sum":
        return mask_BN / mask_BN.shape[0] * n_micro
    return aggregation_weights(mask_BN, mode, n_micro)


def token_rewards(score_B: jax.Array, kl_BN: jax.Array, mask_BN: jax.Array, beta: float | jax.Array) -> jax.Array:
    """r_BN = −β·kl on every response token, plus the sequence's score on its last token."""
    lengths_B = mask_BN.sum(-1).astype(jnp.int32)
    last_BN = jax.nn.one_hot(jnp.maximum(lengths_B, 1) - 1, mask_BN.shape[1]) * (lengths_B > 0)[:, None]
    return (-beta * kl_BN + score_B[:, None] * last_BN) * mask_BN


def gae(
    rewards_BN: jax.Array, values_BN: jax.Array, mask_BN: jax.Array, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over each response: (advantages_BN, returns_BN), 0 after the response.

    δ_t = r_t + γ·V_{t+1} − V_t with V = 0 after the last token; A_t = δ_t + γλ·A_{t+1}; returns R_t = A_t + V_t.
    """
    values_BN = values_BN * mask_BN
    next_values_BN = jnp.concatenate([values_BN[:, 1:], jnp.zeros_like(values_BN[:, :1])], axis=1)
    deltas_BN = (rewards_BN + gamma * next_values_BN - values_BN) * mask_BN

    def back(adv_next_B: jax.Array, xs: tuple) -> tuple[jax.Array, jax.Array]:
        delta_B, m_B = xs
        adv_B = (delta_B + gamma * lam * adv_next_B) * m_B
        return adv_B, adv_B

    _, adv_NB = jax.lax.scan(back, jnp.zeros(rewards_BN.shape[0]), (deltas_BN.T, mask_BN.T), reverse=True)
    advantages_BN = adv_NB.T
    return advantages_BN, (advantages_BN + values_BN) * mask_BN


def whiten(x_BN: jax.Array, mask_BN: jax.Array, shift_mean: bool = True) -> jax.Array:
    """(x − mean) / std over the masked tokens (`shift_mean=False` only rescales: keeps the rewards' sign)."""
    n = jnp.maximum(mask_BN.sum(), 1.0)
    mean = jnp.sum(x_BN * mask_BN) / n
    var = jnp.sum(((x_BN - mean) * mask_BN) ** 2) / n
    out = (x_BN - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask_BN


def adaptive_kl_coef(beta: float, kl: float, target: float, horizon: int, n_samples: int) -> float:
    """Ziegler et al.'s controller: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon)."""
    error = float(np.clip(kl / target - 1.0, -0.2, 0.2))
    return beta * (1.0 + error * n_samples / horizon)


class ScaleByAdamTFState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_adam_tf(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Adam with TF1's ε: lr·√(1 − b2^t)/(1 − b1^t) · m/(√v + ε) (ε outside the bias correction)."""

    def init(params: optax.Params) -> ScaleByAdamTFState:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return ScaleByAdamTFState(jnp.zeros([], jnp.int32), zeros, zeros)

    def update(updates: optax.Updates, state: ScaleByAdamTFState, params: optax.Params | None = None) -> tuple:
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        count = state.count + 1
        t = count.astype(jnp.float32)
        correction = jnp.sqrt(1 - b2**t) / (1 - b1**t)
        out = jax.tree.map(lambda m, v: correction * m / (jnp.sqrt(v) + eps), mu, nu)
        return out, ScaleByAdamTFState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def make_adam(
    lr: float | optax.Schedule, eps: float, placement: str, grad_clip: float, b1: float = 0.9, b2: float = 0.999
) -> optax.GradientTransformation:
    """Adam (no weight decay) with the chosen ε placement, after global-norm clipping."""
    scale = optax.scale_by_adam(b1, b2, eps) if placement == "torch" else scale_by_adam_tf(b1, b2, eps)
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    return optax.chain(*parts, scale, optax.scale_by_learning_rate(lr))


def _clip_stats(ratio_BN: jax.Array, adv_BN: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    surrogate_BN = jnp.minimum(ratio_BN * adv_BN, jnp.clip(ratio_BN, 1 - eps, 1 + eps) * adv_BN)
    clipped_BN = ((adv_BN > 0) & (ratio_BN > 1 + eps)) | ((adv_BN < 0) & (ratio_BN < 1 - eps))
    return surrogate_BN, clipped_BN


def _value_loss(values_BN: jax.Array, batch: Batch, eps: float) -> jax.Array:
    clipped_BN = batch["old_values_BN"] + jnp.clip(values_BN - batch["old_values_BN"], -eps, eps)
    return 0.5 * jnp.maximum((values_BN - batch["returns_BN"]) ** 2, (clipped_BN - batch["returns_BN"]) ** 2)


def _forward(params: model.Params, batch: Batch, cfg: ModelConfig, pc: PPOConfig) -> tuple:
    logp_BN, entropy_BN = token_logprobs(
        params["policy"], batch["prompt_BP"], batch["prompt_lens_B"], batch["tokens_BN"], cfg, pc.temperature
    )
    values_BN = reward_model.values(params["value"], batch["prompt_BP"], batch["prompt_lens_B"], batch["tokens_BN"],
                                    cfg)
    return logp_BN, entropy_BN, values_BN


def ppo_loss(cfg: ModelConfig, pc: PPOConfig) -> LossFn:
    """Σ w·(−min(ρA, clip(ρ)A) + c_v·value loss − c_H·entropy) over response tokens; params {policy, value}."""

    def loss_fn(params: model.Params, batch: Batch, key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        logp_BN, entropy_BN, values_BN = _forward(params, batch, cfg, pc)
        surrogate_BN, _ = _clip_stats(jnp.exp(logp_BN - batch["old_logp_BN"]), batch["adv_BN"], pc.clip_ratio)
        loss_BN = -surrogate_BN + pc.vf_coef * _value_loss(values_BN, batch, pc.clip_value)
        if pc.entropy_coef:
            loss_BN = loss_BN - pc.entropy_coef * entropy_BN
        return jnp.sum(batch["weight_BN"] * loss_BN), {}

    return loss_fn


@functools.partial(jax.jit, static_argnames=("cfg", "pc"))
def diagnostics(params: model.Params, batch: Batch, *, cfg: ModelConfig, pc: PPOConfig) -> dict[str, jax.Array]:
    """Token means after an iteration's updates: approx-KL (k3 of new vs old), clip fraction, entropy, value error."""
    logp_BN, entropy_BN, values_BN = _forward(params, batch, cfg, pc)
    mask_BN = batch["mask_BN"]

    def mean(x_BN: jax.Array) -> jax.Array:
        return jnp.sum(x_BN * mask_BN) / jnp.maximum(mask_BN.sum(), 1.0)

    _, clipped_BN = _clip_stats(jnp.exp(logp_BN - batch["old_logp_BN"]), batch["adv_BN"], pc.clip_ratio)
    return {"approx_kl": mean(kl.k3(logp_BN, batch["old_logp_BN"])), "clip_frac": mean(clipped_BN),
            "entropy": mean(entropy_BN), "value_error": mean((values_BN - batch["returns_BN"]) ** 2)}


@functools.partial(jax.jit, static_argnames=("cfg", "pc"))
def prepare(
    params: model.Params,
    ref_params: model.Params,
    rollout: dict[str, jax.Array],
    score_B: jax.Array,
    beta: jax.Array,
    *,
    cfg: ModelConfig,
    pc: PPOConfig,
) -> Batch:
    """A scored rollout → the loss's inputs: KL-penalised token rewards, old values, GAE advantages and returns."""
    mask_BN = rollout["mask_BN"]
    old_logp_BN, _, old_values_BN = _forward(params, rollout, cfg, pc)
    ref_logp_BN, _ = token_logprobs(ref_params, rollout["prompt_BP"], rollout["prompt_lens_B"], rollout["tokens_BN"],
                                    cfg, pc.temperature)
    estimator = kl.k1 if pc.kl_estimator == "k1" else kl.k3
    kl_BN = estimator(old_logp_BN, ref_logp_BN) * mask_BN
    rewards_BN = token_rewards(score_B, kl_BN, mask_BN, beta)
    if pc.whiten_rewards:
        rewards_BN = whiten(rewards_BN, mask_BN, shift_mean=False)
    adv_BN, returns_BN = gae(rewards_BN, old_values_BN * mask_BN, mask_BN, pc.gamma, pc.lam)
    if pc.whiten_advantages:
        adv_BN = whiten(adv_BN, mask_BN)
    return {
        "prompt_BP": rollout["prompt_BP"], "prompt_lens_B": rollout["prompt_lens_B"], "tokens_BN": rollout["tokens_BN"],
        "mask_BN": mask_BN, "old_logp_BN": old_logp_BN, "old_values_BN": old_values_BN * mask_BN, "adv_BN": adv_BN,
        "returns_BN": returns_BN, "seq_kl_B": jnp.sum(kl.k1(old_logp_BN, ref_logp_BN) * mask_BN, axis=1),
    }


# ------------------------------------------------------------------------------------------------------ loop


def _static(pc: PPOConfig) -> PPOConfig:
    """The config with its runtime values neutralised: β enters the compiled functions as an argument and the peak
    learning rate lives in the optimizer state, so runs that differ only in them (a β sweep, the adaptive arm, the
    over-optimisation arm's larger learning rate) share their compiled programs."""
    return dataclasses.replace(pc, kl_coef=0.0, adaptive_kl=False, target_kl=1.0, kl_horizon=1, learning_rate=1.0)


_MINIBATCH_KEYS = ("prompt_BP", "prompt_lens_B", "tokens_BN", "old_logp_BN", "old_values_BN", "adv_BN", "returns_BN")


@functools.cache
def _compiled_update(cfg: ModelConfig, pc: PPOConfig) -> tuple[optax.GradientTransformation, Callable]:
    """(optimizer, update): update(state, batch, order_KR, epoch_K, key) runs one iteration's K = epochs ×
    minibatches optimizer steps (minibatch k = rows order_KR[k] of the prepared batch) in one compiled scan: no
    host round trip per minibatch. The optimizer's last stage scales by the peak learning rate held in its state
    (`set_learning_rate`); the warmup schedule before it runs from 1/warmup to 1."""
    warmup = max(pc.warmup_iters * pc.epochs * pc.minibatches, 1)
    optimizer = optax.chain(
        make_adam(optax.linear_schedule(1.0 / warmup, 1.0, warmup), pc.adam_eps, pc.adam_eps_placement, pc.grad_clip),
        optax.inject_hyperparams(optax.scale)(step_size=1.0),
    )
    step_fn = make_train_step(ppo_loss(cfg, pc), optimizer)

    def update(state: State, batch: Batch, order_KR: jax.Array, epoch_K: jax.Array, key: jax.Array) -> tuple:
        def one(state: State, xs: tuple) -> tuple:
            rows_R, epoch = xs
            mini = {k: batch[k][rows_R] for k in _MINIBATCH_KEYS}
            mini["weight_BN"] = loss_weights(batch["mask_BN"][rows_R], pc.aggregation, pc.n_micro)
            return step_fn(state, add_micro_axis(mini, pc.n_micro), jax.random.fold_in(key, epoch))

        state, metrics_K = jax.lax.scan(one, state, (order_KR, epoch_K))
        return state, jax.tree.map(lambda m_K: m_K[-1], metrics_K)

    return optimizer, jax.jit(update, donate_argnums=0)


def set_learning_rate(opt_state: optax.OptState, learning_rate: float) -> optax.OptState:
    """The optimizer state of `_compiled_update` with its peak learning rate set (a runtime value: no recompile)."""
    adam_state, scale_state = opt_state
    hyperparams = {**scale_state.hyperparams, "step_size": jnp.asarray(learning_rate, jnp.float32)}
    return adam_state, scale_state._replace(hyperparams=hyperparams)


ScoreFn = Callable[[dict[str, np.ndarray]], np.ndarray]  # host-side rollout → score_B (the reward PPO maximises)


def train(
    policy: model.Params,
    value: model.Params,
    *,
    ref_params: model.Params,
    score_fn: ScoreFn,
    prompts_XP: np.ndarray,
    cfg: ModelConfig,
    pc: PPOConfig,
    sc: SamplingConfig,
    max_new_tokens: int,
    key: jax.Array,
    iters: int,
    seed: int = 0,
    on_iter: Callable[[int, dict[str, float], dict[str, np.ndarray]], None] | None = None,
) -> tuple[model.Params, list[dict[str, float]]]:
    """`iters` PPO iterations from (policy, value): (final policy params, per-iteration history).

    Iteration i draws `rollouts_per_iter` prompts as a pure function of (seed, i). `score_fn` sees the host copy of
    the rollout (prompt_BP, tokens_BN, lengths_B) and returns the score of each response. `on_iter(i, record,
    rollout)` may add entries to the record.
    """
    if sc.temperature != pc.temperature or sc.top_k is not None or sc.top_p is not None:
        raise UserError("sample at the loss's temperature without top-k/top-p: the ratios need the same distribution")
    optimizer, update = _compiled_update(cfg, _static(pc))
    params = jax.tree.map(jnp.copy, {"policy": policy, "value": value})
    state: State = {"step": jnp.int32(0), "params": params,
                    "opt_state": set_learning_rate(optimizer.init(params), pc.learning_rate)}
    beta = pc.kl_coef
    B, mb = pc.rollouts_per_iter, pc.rollouts_per_iter // pc.minibatches
    epoch_K = np.repeat(np.arange(pc.epochs, dtype=np.int32), pc.minibatches)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for it in range(iters):
        rng = np.random.default_rng([seed, it])
        idx = rng.choice(len(prompts_XP), B, replace=len(prompts_XP) < B)
        it_key = jax.random.fold_in(key, it)
        prompt_BP = prompts_XP[idx]
        rollout = sample_groups(state["params"]["policy"], prompt_BP, np.full(B, prompt_BP.shape[1], np.int32),
                                it_key, cfg=cfg, group_size=1, max_new_tokens=max_new_tokens, sc=sc)
        host = {"prompt_BP": prompt_BP, "tokens_BN": np.asarray(rollout["tokens_BN"]),
                "lengths_B": np.asarray(rollout["lengths_B"])}
        score_B = np.asarray(score_fn(host), np.float32)
        batch = prepare(state["params"], ref_params, rollout, jnp.asarray(score_B), jnp.float32(beta), cfg=cfg,
                        pc=_static(pc))
        # Each epoch is a fresh shuffle of the rollout, cut into `minibatches` minibatches of mb rows.
        order_KR = np.concatenate([rng.permutation(B).reshape(pc.minibatches, mb) for _ in range(pc.epochs)])
        state, metrics = update(state, batch, order_KR, epoch_K, it_key)
        seq_kl = float(jnp.mean(batch["seq_kl_B"]))
        record = {
            "iter": it + 1, "score": float(score_B.mean()), "seq_kl": seq_kl, "beta": beta,
            "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
            "length": float(host["lengths_B"].mean()),
            **{k: float(v) for k, v in diagnostics(state["params"], batch, cfg=cfg, pc=_static(pc)).items()},
            "time_s": time.perf_counter() - start,
        }
        if pc.adaptive_kl:
            beta = adaptive_kl_coef(beta, seq_kl, pc.target_kl, pc.kl_horizon, B)
        if on_iter is not None:
            on_iter(it + 1, record, host)
        history.append(record)
    return state["params"]["policy"], history
