"""The RLHF pipeline's shared stages and measurements: pretrain → label pairs → reward model, evaluation, frontier.

`shared_stages` pretrains the reference policy on the world's text, samples response pairs from it on training
prompts, labels them with the world's noisy labeller, and trains a reward model; the result is cached in the
workdir under a hash of every setting that shapes it, so a sweep of PPO / DPO runs (or a second experiment on the
same workdir) reuses it. `evaluate` measures a policy on fresh prompts against the ground truth.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pickle
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llmjax import model
from llmjax.config import ModelConfig, TrainConfig
from llmjax.errors import UserError
from llmjax.generate import SamplingConfig
from llmjax.metrics import console
from llmjax.optim import make_optimizer
from llmjax.rl import dpo, ppo, reward_model, world
from llmjax.rl.rollout import add_micro_axis, response_mask, sample_groups, token_logprobs
from llmjax.train import lm_loss, make_train_step


@dataclass(frozen=True)
class PipelineConfig:
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    pretrain_steps: int = 600
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    n_train_prompts: int = 4096  # prompts for labelling and RL rollouts
    n_pairs: int = 4096  # labelled pairs for the reward model and DPO
    n_heldout_pairs: int = 1024  # pairs on evaluation prompts: the reward model's held-out accuracy
    rm_steps: int = 200
    rm_batch: int = 64
    rm_lr: float = 1e-3
    rm_ensemble: int = 1  # reward models from different inits and batch orders; PPO maximises their mean score
    n_eval_prompts: int = 512

    def validate(self) -> PipelineConfig:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) <= 0:
                raise UserError(f"{f.name}={getattr(self, f.name)} must be positive")
        if self.n_pairs > self.n_train_prompts:
            raise UserError(f"n_pairs={self.n_pairs} needs as many training prompts (n_train_prompts)")
        return self


def model_config(w: world.World, pc: PipelineConfig) -> ModelConfig:
    return ModelConfig(vocab_size=w.vocab_size, block_size=w.cfg.prompt_len + w.cfg.max_new_tokens,
                       n_layer=pc.n_layer, n_head=pc.n_head, n_embd=pc.n_embd).validate()


def sampling(temperature: float = 1.0) -> SamplingConfig:
    return SamplingConfig(temperature=temperature, stop_token=world.EOS, pad_id=world.PAD)


def _new_state(params: model.Params, optimizer) -> dict:
    params = jax.tree.map(jnp.copy, params)
    return {"step": jnp.int32(0), "params": params, "opt_state": optimizer.init(params)}


# ---------------------------------------------------------------------------------------------------- stages


# The compiled steps are cached per configuration: a multi-seed run (or a β sweep of DPO over seeds) compiles
# each once instead of once per call.
@functools.cache
def _pretrain_step(cfg: ModelConfig, pc: PipelineConfig) -> tuple[optax.GradientTransformation, Any]:
    tc = TrainConfig(batch_size=pc.pretrain_batch, max_iters=pc.pretrain_steps, learning_rate=pc.pretrain_lr,
                     min_lr=pc.pretrain_lr / 10, warmup_iters=50, weight_decay=0.0).validate()
    optimizer = make_optimizer(tc, model.param_axes(cfg))
    return optimizer, jax.jit(make_train_step(lm_loss(cfg), optimizer), donate_argnums=0)


@functools.cache
def _reward_model_step(cfg: ModelConfig, lr: float) -> tuple[optax.GradientTransformation, Any]:
    optimizer = ppo.make_adam(lr, 1e-8, "torch", grad_clip=1.0)
    return optimizer, jax.jit(make_train_step(reward_model.bt_loss(cfg), optimizer), donate_argnums=0)


@functools.cache
def _dpo_run(
    cfg: ModelConfig, dc: dpo.DPOConfig, steps: int, lr: float, n_micro: int
) -> tuple[optax.GradientTransformation, Any]:
    """(optimizer, run): run(state, pairs, rows_SB, key) takes DPO step s on rows rows_SB[s] of the pair dataset,
    every step in one compiled scan (the dataset lives on the device; no host round trip per step)."""
    warmup = max(steps // 10, 1)
    optimizer = ppo.make_adam(optax.linear_schedule(lr / warmup, lr, warmup), 1e-8, "torch", grad_clip=1.0)
    step_fn = make_train_step(dpo.dpo_loss(cfg, dc), optimizer)

    def run(state: dict, pairs: dict, rows_SB: jax.Array, key: jax.Array) -> dict:
        def one(state: dict, rows_B: jax.Array) -> tuple[dict, None]:
            return step_fn(state, add_micro_axis(dpo.make_batch(pairs, rows_B, n_micro), n_micro), key)[0], None

        return jax.lax.scan(one, state, rows_SB)[0]

    return optimizer, jax.jit(run, donate_argnums=0)


def pretrain(w: world.World, cfg: ModelConfig, pc: PipelineConfig, seed: int) -> model.Params:
    """The reference policy: next-token prediction on the world's text (prompt words, response words, EOS)."""
    optimizer, step_fn = _pretrain_step(cfg, pc)
    key = jax.random.key(seed)
    state = _new_state(model.init(cfg, key), optimizer)
    rows_XT = w.sample_text(np.random.default_rng([seed, 10]), pc.pretrain_steps * pc.pretrain_batch)
    for step in range(pc.pretrain_steps):
        rows = rows_XT[step * pc.pretrain_batch: (step + 1) * pc.pretrain_batch]
        state, metrics = step_fn(state, add_micro_axis({"x": rows[:, :-1], "y": rows[:, 1:]}), key)
        if (step + 1) % 500 == 0 or step + 1 == pc.pretrain_steps:
            console(f"pretrain step {step + 1}: loss {float(metrics['loss']):.4f}")
    return state["params"]


def sample_responses(
    params: model.Params, prompts_XP: np.ndarray, key: jax.Array, *, cfg: ModelConfig, max_new_tokens: int,
    group_size: int = 1, chunk: int = 256, temperature: float = 1.0,
) -> dict[str, np.ndarray]:
    """`group_size` responses per prompt (rows x·G + g), in fixed-size chunks: prompt_BP, tokens_BN, lengths_B."""
    n = len(prompts_XP)
    parts: dict[str, list] = {"prompt_BP": [], "tokens_BN": [], "lengths_B": []}
    for i in range(0, n, chunk):
        rows = np.arange(i, i + chunk) % n
        out = sample_groups(params, prompts_XP[rows], np.full(chunk, prompts_XP.shape[1], np.int32),
                            jax.random.fold_in(key, i), cfg=cfg, group_size=group_size,
                            max_new_tokens=max_new_tokens, sc=sampling(temperature))
        for k in parts:
            parts[k].append(np.asarray(out[k]))
    return {k: np.concatenate(v)[: n * group_size] for k, v in parts.items()}


def label_pairs(
    w: world.World, params: model.Params, prompts_XP: np.ndarray, key: jax.Array, rng: np.random.Generator,
    cfg: ModelConfig,
) -> dict[str, np.ndarray]:
    """Two reference samples per prompt, ordered by the noisy labeller; true rewards kept for evaluation only."""
    s = sample_responses(params, prompts_XP, key, cfg=cfg, max_new_tokens=w.cfg.max_new_tokens, group_size=2)
    r_true = world.true_reward(w, s["prompt_BP"], s["tokens_BN"], s["lengths_B"])
    first = rng.permutation(2)[0]  # which sample of a pair is "a" carries no information
    a, b = slice(first, None, 2), slice(1 - first, None, 2)
    prefer_a = world.label(w, r_true[a], r_true[b], rng)
    pick = prefer_a[:, None]
    out = {"prompt_BP": prompts_XP.astype(np.int32),
           "prompt_lens_B": np.full(len(prompts_XP), prompts_XP.shape[1], np.int32)}
    for side, mine, other in (("chosen", a, b), ("rejected", b, a)):
        out[f"{side}_BN"] = np.where(pick, s["tokens_BN"][mine], s["tokens_BN"][other])
        out[f"{side}_len_B"] = np.where(prefer_a, s["lengths_B"][mine], s["lengths_B"][other])
        out[f"{side}_true_B"] = np.where(prefer_a, r_true[mine], r_true[other])
    return out


def train_reward_model(
    lm_params: model.Params, pairs: dict[str, np.ndarray], cfg: ModelConfig, pc: PipelineConfig, seed: int,
    member: int = 0,
) -> model.Params:
    """Bradley–Terry on the labelled pairs, the trunk started from the pretrained LM; `member` k > 0 of an ensemble
    draws its own head init and batch order."""
    optimizer, step_fn = _reward_model_step(cfg, pc.rm_lr)
    key = jax.random.key(seed) if member == 0 else jax.random.fold_in(jax.random.key(seed), member)
    state = _new_state(reward_model.init(lm_params, cfg, key, head_std=0.02), optimizer)
    n, B = len(pairs["prompt_BP"]), pc.rm_batch
    for step in range(pc.rm_steps):
        rows = np.random.default_rng([seed, 20, step] + [member] * (member > 0)).choice(n, B, replace=False)
        batch = {k: pairs[k][rows] for k in reward_model.PAIR_KEYS} | {"weight_B": np.full(B, 1.0 / B, np.float32)}
        state, metrics = step_fn(state, add_micro_axis(batch), key)
        if (step + 1) % 200 == 0 or step + 1 == pc.rm_steps:
            console(f"reward model {member} step {step + 1}: loss {float(metrics['loss']):.4f}")
    return state["params"]


@functools.partial(jax.jit, static_argnames="cfg")
def _rm_scores(params, prompt_BP, tokens_BN, lengths_B, cfg):
    return reward_model.scores(params, prompt_BP, jnp.full(prompt_BP.shape[0], prompt_BP.shape[1]), tokens_BN,
                               lengths_B, cfg)


def rm_scores(rms: list[model.Params], s: dict[str, np.ndarray], cfg: ModelConfig, chunk: int = 256) -> np.ndarray:
    """Raw scores of sampled responses (prompt_BP, tokens_BN, lengths_B), the mean over an ensemble's members."""
    n = len(s["prompt_BP"])
    out = []
    for i in range(0, n, chunk):
        rows = np.arange(i, i + min(chunk, n)) % n
        out.append(np.mean([np.asarray(_rm_scores(rm, s["prompt_BP"][rows], s["tokens_BN"][rows],
                                                  s["lengths_B"][rows], cfg=cfg)) for rm in rms], axis=0))
    return np.concatenate(out)[:n]


# ---------------------------------------------------------------------------------------------------- caching


def _digest(*parts: Any) -> str:
    text = json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cached(path: str, make: Any) -> Any:
    """`make()`'s result, pickled at `path` (host arrays) the first time and loaded after."""
    if os.path.exists(path):
        with open(path, "rb") as f:
            return pickle.load(f)
    value = jax.device_get(make())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        pickle.dump(value, f)
    os.replace(path + ".tmp", path)  # atomic: an interrupted run never leaves a half-written cache
    return value


def shared_stages(workdir: str, w: world.World, pc: PipelineConfig, seed: int) -> dict[str, Any]:
    """Pretrained reference policy, labelled pairs (train / held-out), reward model and its normaliser, cached.

    Returns a dict with `ref`, `rm` (a list: the ensemble's members), `rm_norm`, `train_pairs`, `heldout_pairs`,
    `train_prompts`, `eval_prompts`, `rm_acc` (held-out accuracy against the labels and the truth) and `stage_s`
    (seconds per stage, this run).
    """
    cfg = model_config(w, pc)
    # Each stage's file is named by a digest of the settings it depends on (its own and every earlier stage's),
    # so changing, say, the reward model's steps reuses the pretrained model and the pairs.
    stage_fields = {
        "pretrained": ("n_layer", "n_embd", "n_head", "pretrain_steps", "pretrain_batch", "pretrain_lr"),
        "pairs": ("n_train_prompts", "n_pairs", "n_heldout_pairs", "n_eval_prompts"),
        "reward_model": ("rm_steps", "rm_batch", "rm_lr", "rm_ensemble"),
    }
    times: dict[str, float] = {}
    settings: dict[str, Any] = {"world": dataclasses.asdict(w.cfg), "seed": seed}

    def timed(name: str, make: Any) -> Any:
        settings.update({f: getattr(pc, f) for f in stage_fields[name]})
        path = os.path.join(workdir, "shared", f"seed{seed}", f"{name}-{_digest(settings)}.pkl")
        start = time.perf_counter()
        value = cached(path, make)
        times[name] = time.perf_counter() - start
        return value

    ref = timed("pretrained", lambda: pretrain(w, cfg, pc, seed))
    rng = np.random.default_rng([seed, 30])
    train_prompts = w.sample_prompts(rng, pc.n_train_prompts)
    eval_prompts = w.sample_prompts(rng, pc.n_eval_prompts)
    key = jax.random.key(seed)

    def make_pairs() -> dict:
        label_rng = np.random.default_rng([seed, 40])
        return {"train": label_pairs(w, ref, train_prompts[: pc.n_pairs], jax.random.fold_in(key, 1), label_rng, cfg),
                "heldout": label_pairs(w, ref, w.sample_prompts(rng, pc.n_heldout_pairs), jax.random.fold_in(key, 2),
                                       label_rng, cfg)}

    pairs = timed("pairs", make_pairs)

    def make_rm() -> dict:
        rm = [train_reward_model(ref, pairs["train"], cfg, pc, seed, k) for k in range(pc.rm_ensemble)]
        ref_samples = sample_responses(ref, train_prompts[:1024], jax.random.fold_in(key, 3), cfg=cfg,
                                       max_new_tokens=w.cfg.max_new_tokens)
        return {"params": rm, "norm": reward_model.normalizer(rm_scores(rm, ref_samples, cfg)),
                "acc": reward_model.pairwise_accuracy(rm, pairs["heldout"], cfg)}

    rm = timed("reward_model", make_rm)
    return {"cfg": cfg, "ref": ref, "rm": rm["params"], "rm_norm": rm["norm"], "rm_acc": rm["acc"],
            "train_pairs": pairs["train"], "heldout_pairs": pairs["heldout"], "train_prompts": train_prompts,
            "eval_prompts": eval_prompts, "stage_s": times}


# ------------------------------------------------------------------------------------------------ measurement


_logprobs = jax.jit(token_logprobs, static_argnames=("cfg", "temperature"))


def evaluate(
    policy: model.Params, ref: model.Params, w: world.World, prompts_XP: np.ndarray, key: jax.Array, *,
    cfg: ModelConfig, rm: list[model.Params] | None = None, rm_norm: dict[str, float] | None = None,
) -> dict[str, float]:
    """One response per fresh prompt at temperature 1: r* (world units), sequence KL to the reference
    (Σ_t log π − log π_ref, a Monte-Carlo estimate), naturalness per word, distinct words, length, RM score."""
    s = sample_responses(policy, prompts_XP, key, cfg=cfg, max_new_tokens=w.cfg.max_new_tokens)
    lens_B = np.full(len(prompts_XP), prompts_XP.shape[1], np.int32)
    logp_BN, _ = _logprobs(policy, s["prompt_BP"], lens_B, s["tokens_BN"], cfg=cfg, temperature=1.0)
    ref_logp_BN, _ = _logprobs(ref, s["prompt_BP"], lens_B, s["tokens_BN"], cfg=cfg, temperature=1.0)
    mask_BN = np.asarray(response_mask(s["lengths_B"], s["tokens_BN"].shape[1]))
    seq_kl_B = np.sum((np.asarray(logp_BN) - np.asarray(ref_logp_BN)) * mask_BN, axis=1)
    out = {
        "reward": float(world.true_reward(w, s["prompt_BP"], s["tokens_BN"], s["lengths_B"]).mean()),
        "kl": float(seq_kl_B.mean()),
        "chain_ll": float(world.naturalness(w, s["prompt_BP"], s["tokens_BN"], s["lengths_B"]).mean()),
        "distinct": float(world.distinct_words(s["tokens_BN"], s["lengths_B"]).mean()),
        "length": float(s["lengths_B"].mean()),
    }
    if rm is not None:
        out["rm_score"] = float(reward_model.normalized(rm_scores(rm, s, cfg), rm_norm).mean())
    out["example"] = w.decode(np.concatenate([s["prompt_BP"][0], s["tokens_BN"][0]]))
    return out


def frontier_gap(
    dpo_points: list[tuple[float, float]], ppo_points: list[tuple[float, float]], lo: float = 1.0, hi: float = 10.0
) -> dict[str, float | None]:
    """The smallest DPO − PPO reward gap over the KL range both frontiers cover within [lo, hi].

    Each frontier is the piecewise-linear curve through its (kl, reward) points sorted by KL. Returns the gap, the
    KL where it is smallest, the covered range (None if the frontiers do not overlap inside [lo, hi]) and
    `covers_range`: whether that range is all of [lo, hi]. Nothing is extrapolated: where either frontier ends early
    the gap is simply not measured there, and `covers_range` is False.
    """
    def curve(points: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
        pts = sorted(points)
        return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])

    (kd, rd), (kp, rp) = curve(dpo_points), curve(ppo_points)
    a, b = max(lo, kd[0], kp[0]), min(hi, kd[-1], kp[-1])
    if a > b:
        return {"gap": None, "at_kl": None, "kl_from": None, "kl_to": None, "covers_range": False}
    # The gap is piecewise linear, so its minimum is at a breakpoint of either curve or an end of the range.
    grid = np.unique(np.concatenate([[a, b], kd[(kd > a) & (kd < b)], kp[(kp > a) & (kp < b)]]))
    gap = np.interp(grid, kd, rd) - np.interp(grid, kp, rp)
    i = int(np.argmin(gap))
    return {"gap": float(gap[i]), "at_kl": float(grid[i]), "kl_from": float(a), "kl_to": float(b),
            "covers_range": bool(a == lo and b == hi)}


# ------------------------------------------------------------------------------------------------------- DPO


def train_dpo(
    policy: model.Params, pairs: dict[str, np.ndarray], *, cfg: ModelConfig, dc: dpo.DPOConfig, steps: int,
    batch_size: int, learning_rate: float, seed: int, n_micro: int = 1,
) -> model.Params:
    """`steps` DPO steps on shuffled pairs (epochs reshuffled as a function of seed); pairs carry ref log-probs."""
    optimizer, run = _dpo_run(cfg, dc, steps, learning_rate, n_micro)
    n = len(pairs["prompt_BP"])
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    rows_SB = np.concatenate([np.random.default_rng([seed, 50, e]).permutation(n)[: per_epoch * batch_size]
                              for e in range(epochs)]).reshape(-1, batch_size)[:steps]
    state = run(_new_state(policy, optimizer), {k: jnp.asarray(pairs[k]) for k in dpo.BATCH_KEYS}, rows_SB,
                jax.random.key(seed))
    return state["params"]


# ------------------------------------------------------------------------------------------------------- PPO


def run_ppo(
    shared: dict[str, Any], w: world.World, pc: ppo.PPOConfig, *, iters: int, seed: int, reward: str = "rm",
    tag: str = "ppo", log_every: int = 25, on_record: Any = None,
) -> tuple[model.Params, list[dict[str, float]]]:
    """PPO from the reference policy on the reward model (`reward="rm"`) or on the true reward r* (`"true"`).

    The value model starts from the (first) reward model's trunk with a zero head. Each record also gets the
    batch's true reward, naturalness and distinct words, so over-optimisation of the reward model shows in training.
    """
    cfg, rm, norm = shared["cfg"], shared["rm"], shared["rm_norm"]

    def score_fn(s: dict[str, np.ndarray]) -> np.ndarray:
        if reward == "true":
            return world.true_reward(w, s["prompt_BP"], s["tokens_BN"], s["lengths_B"])
        return np.asarray(reward_model.normalized(rm_scores(rm, s, cfg), norm))

    def on_iter(it: int, record: dict[str, float], s: dict[str, np.ndarray]) -> None:
        record["true_reward"] = float(world.true_reward(w, s["prompt_BP"], s["tokens_BN"], s["lengths_B"]).mean())
        record["chain_ll"] = float(world.naturalness(w, s["prompt_BP"], s["tokens_BN"], s["lengths_B"]).mean())
        record["distinct"] = float(world.distinct_words(s["tokens_BN"], s["lengths_B"]).mean())
        if it % log_every == 0 or it == 1:
            console(f"{tag} iter {it}: score {record['score']:.3f}, r* {record['true_reward']:.3f}, "
                    f"seq KL {record['seq_kl']:.2f}, β {record['beta']:.4f}, approx-KL {record['approx_kl']:.4f}, "
                    f"clip {record['clip_frac']:.3f}, entropy {record['entropy']:.3f}, "
                    f"value err {record['value_error']:.3f}, distinct {record['distinct']:.1f}, "
                    f"{record['time_s']:.0f}s")
        if on_record is not None:
            on_record(it, record)

    value = reward_model.init(rm[0]["trunk"], cfg, jax.random.key(seed))
    return ppo.train(shared["ref"], value, ref_params=shared["ref"], score_fn=score_fn,
                     prompts_XP=shared["train_prompts"], cfg=cfg, pc=pc, sc=sampling(pc.temperature),
                     max_new_tokens=w.cfg.max_new_tokens, key=jax.random.key(1000 + seed), iters=iters, seed=seed,
                     on_iter=on_iter)
