"""Architecture claims at CPU scale: GPT-2 vs Llama block, MHA/GQA/MQA, MoE, sliding window, MLA, and LoRA.

    python -m experiments.architectures                                   # every arm, 2 seeds (tiny-shakespeare)
    python -m experiments.architectures --arms=gpt2,llama --seeds=0       # a subset (finished arms are reused)
    python -m experiments.architectures --smoke --workdir=/tmp/arch       # CI: tiny model, embedded corpora, < 2 min

Pretraining arms: a char-level model on --data (4 layers, d=128, 4 heads, context 128, batch 16, AdamW 1e-3 with
warmup and cosine decay), each for --steps with the same batches (the batch of step s is a function of the seed and
s only) and the same optimizer; val loss on one fixed set of held-out batches shared by every arm.
    gpt2      GPT-2 block: LayerNorm, GELU MLP, learned positions, biases
    llama     Llama block: RMSNorm, SwiGLU, RoPE, no biases; its MLP width is chosen so the total parameter count
              equals gpt2's. It is also the MHA, dense and full-attention baseline of the arms below.
    gqa       llama with 2 K/V heads of 4 (grouped-query attention)
    mqa       llama with 1 K/V head (multi-query attention)
    window    llama with sliding-window attention over the last 32 positions (Mistral)
    moe       llama with 8 SwiGLU experts of half the MLP width, top-2 routing: equal active parameters per token
    mla       llama with multi-head latent attention (K/V latent of rank 32, decoupled RoPE key of 16)
Fine-tuning arms: a byte-level llama pretrained on --data for --steps (arm `bytes_pretrain`), then fine-tuned for
--finetune_steps on --finetune_data (the embedded Python-stdlib corpus) with the same AdamW schedule but no weight
decay; val loss on that corpus.
    ft_none  no fine-tuning          ft_full  every weight trained      ft_scratch  the same steps from a fresh init
    lora_all_r4, lora_all_r16        LoRA on every linear map of the blocks (q, k, v, o, gate, up, down)
    lora_qv_r16                      LoRA on the query and value maps only

Each finished (arm, seed) is cached in --workdir/runs/ under a hash of everything that determines it, so a killed
run, or one split into --arms subsets, resumes without retraining; the pretrained byte model of each seed is kept in
--workdir/pretrained/.

Writes to --workdir: summary.json, curves.png (val loss vs step per arm) and prints a table. summary.json keys:
    arms      arm name -> val_loss (mean over seeds), val_loss_per_seed, seeds, params (all weights),
              active_params (used per token: MoE counts top-k experts), trainable_params (updated by the
              optimizer), trainable_fraction, kv_bytes_per_token (KV cache per token over all layers, in the
              compute dtype), decode_cache_bytes (the cache generate allocates for N tokens, N -> bytes),
              ms_per_step (mean train step time, compile excluded; null for ft_none), stage, curve (step ->
              mean val loss), and for moe: expert_fraction_min / _max (per-layer share of routed tokens),
              dropped_fraction, dispatch_overhead_ms (moe step time minus llama's at equal active parameters)
    checks    each of the paper claims this experiment checks: value(s), target, met (bool); present when its arms ran
    config    the base model, steps, batch, learning rate, corpora, eval batches
    wall_time_s  this invocation (cached arms cost nothing)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from llmjax import data as data_lib
from llmjax import lora, model, train
from llmjax.config import ModelConfig, TrainConfig
from llmjax.errors import UserError, absl_main
from llmjax.metrics import console
from llmjax.optim import make_optimizer

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_ARMS = ("gpt2", "llama", "gqa", "mqa", "window", "moe", "mla")
FINETUNE_ARMS = ("bytes_pretrain", "ft_none", "ft_full", "ft_scratch", "lora_all_r4", "lora_all_r16", "lora_qv_r16")
DECODE_LENGTHS = (256, 1024, 4096)
# XLA's RngBitGenerator: initialising a model under jit compiles ~3x faster than with threefry keys.
KEY_IMPL = "rbg"
LORA_ARMS = {"lora_all_r4": (4, "all"), "lora_all_r16": (16, "all"), "lora_qv_r16": (16, "qv")}

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/architectures", "outputs and the cache of finished arms")
flags.DEFINE_list("seeds", ["0", "1"], "seeds: model init and the batch order of every arm")
flags.DEFINE_list("arms", ["all"], f"arms to run: all, or from {', '.join(PRETRAIN_ARMS + FINETUNE_ARMS)}")
flags.DEFINE_integer("steps", 200, "pretraining steps of every pretraining arm and of the byte model")
flags.DEFINE_integer("finetune_steps", 200, "fine-tuning steps of the ft_* and lora_* arms")
flags.DEFINE_integer("eval_every", 100, "steps between val-loss evaluations (must divide both step counts)")
flags.DEFINE_integer("eval_batches", 20, "fixed held-out batches per evaluation, the same for every arm")
flags.DEFINE_integer("batch_size", 16, "sequences per step")
flags.DEFINE_integer("block_size", 128, "context length")
flags.DEFINE_float("learning_rate", 1e-3, "AdamW peak learning rate (every arm)")
flags.DEFINE_float(
    "moe_capacity_factor", ModelConfig.capacity_factor, "the moe arm's expert capacity (slots per routed token share)"
)
flags.DEFINE_float("lora_alpha", 16.0, "LoRA alpha: the update is (alpha / rank)·A·B")
flags.DEFINE_string("data", "tinyshakespeare", "pretraining corpus (tinyshakespeare | text:PATH | pystdlib | hf:NAME)")
flags.DEFINE_string("finetune_data", "pystdlib", "fine-tuning corpus of the LoRA comparison")
flags.DEFINE_string("data_cache", None, "token cache root (default ~/.cache/llmjax/data)")
flags.DEFINE_integer("workers", 1, "train the seeds in this many processes (one XLA thread each), then summarize")
flags.DEFINE_bool("worker", False, "internal: a process started by --workers; trains and caches, writes no summary")
flags.DEFINE_bool("smoke", False, "CI: a 1-layer width-32 model, 20 steps, in-repo corpora; the numbers mean nothing")

# The flags a --workers child process inherits.
OWN_FLAGS = tuple(
    "workdir seeds arms steps finetune_steps eval_every eval_batches batch_size block_size learning_rate lora_alpha "
    "moe_capacity_factor "
    "data finetune_data data_cache workers smoke".split()
)
SMOKE = dict(steps=20, finetune_steps=20, eval_every=10, eval_batches=2, batch_size=8, block_size=32)
BASE = dict(n_layer=4, n_head=4, n_embd=128)
SMOKE_BASE = dict(n_layer=1, n_head=4, n_embd=32)


# ------------------------------------------------------------------------------------------------------- arms


def gpt2_config(vocab: int, block: int, base: dict) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, block_size=block, bias=True, **base).validate()


def llama_config(vocab: int, block: int, base: dict) -> ModelConfig:
    """The Llama block with the even MLP width that brings its parameter count closest to the GPT-2 block's."""
    target = model.count_params(_abstract_params(gpt2_config(vocab, block, base)))

    def make(hidden: int) -> ModelConfig:
        return ModelConfig(
            vocab_size=vocab, block_size=block, norm="rmsnorm", mlp="swiglu", position="rope", mlp_hidden=hidden, **base
        ).validate()

    # The count is linear in the MLP width: two widths give its slope and offset.
    n2, n4 = (model.count_params(_abstract_params(make(h))) for h in (2, 4))
    slope = (n4 - n2) / 2
    return make(max(2, 2 * round((2 + (target - n2) / slope) / 2)))


def arm_config(
    arm: str, vocab: int, block: int, base: dict, moe_capacity_factor: float = ModelConfig.capacity_factor
) -> ModelConfig:
    """The model of a pretraining arm; every arm but gpt2 is the llama block with one switch changed."""
    if arm == "gpt2":
        return gpt2_config(vocab, block, base)
    llama = llama_config(vocab, block, base)
    switches = {
        "llama": {},
        "gqa": dict(n_kv_head=2),
        "mqa": dict(n_kv_head=1),
        "window": dict(sliding_window=block // 4),
        "moe": dict(n_experts=8, moe_top_k=2, expert_hidden=llama.hidden_dim // 2, capacity_factor=moe_capacity_factor),
        "mla": dict(mla_kv_rank=llama.n_embd // 4, mla_rope_dim=llama.head_dim // 2),
    }[arm]
    return dataclasses.replace(llama, **switches).validate()


def _abstract_params(cfg: ModelConfig) -> Any:
    return jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))


# ------------------------------------------------------------------------------------------------- training


@dataclasses.dataclass
class Compiled:
    """One arm's programs: parameter init, train-state init, a scan chunk of `eval_every` steps, evaluation."""

    init_params: Callable
    init_state: Callable
    chunk: Callable
    evaluate: Callable
    compile_s: float


class Runner:
    """Trains arms on one device, compiling each distinct (model, schedule, adapters, data shape) once."""

    def __init__(self) -> None:
        self._compiled: dict[tuple, Compiled] = {}

    def compiled(
        self, cfg: ModelConfig, tc: TrainConfig, lcfg: lora.LoRAConfig | None, data: dict, frozen: Any
    ) -> Compiled:
        key = (cfg, tc, lcfg, data["tokens"].shape, data["eval_x"].shape)
        if key not in self._compiled:
            self._compiled[key] = compile_arm(cfg, tc, lcfg, data, frozen)
            console(f"  compiled in {self._compiled[key].compile_s:.1f}s")
        return self._compiled[key]

    def train(
        self,
        name: str,
        cfg: ModelConfig,
        tc: TrainConfig,
        seed: int,
        data: dict,
        *,
        start: Any = None,
        lcfg: lora.LoRAConfig | None = None,
    ) -> tuple[dict, Any]:
        """Train one arm for one seed from fresh weights, from `start` (full fine-tuning), or LoRA over `start`.

        The batch of step s is a function of (seed, s) only, so every arm of a seed sees the same tokens in the
        same order; the init key is the seed's too. Returns (record, the effective params after training).
        """
        frozen = start if lcfg else None
        compiled = self.compiled(cfg, tc, lcfg, data, frozen)
        key = jax.random.key(seed, impl=KEY_IMPL)
        if lcfg or start is None:
            params = compiled.init_params(jax.random.fold_in(key, 1), frozen)
        else:  # a copy: the chunk donates its state, and `start` is reused by the other arms
            params = jax.tree.map(jnp.copy, start)
        state = compiled.init_state(params)
        val, aux = compiled.evaluate(state["params"], frozen, data["eval_x"], data["eval_y"])
        curve = [{"step": 0, "val_loss": float(val)}]
        steps, every, train_s = tc.max_iters, FLAGS.eval_every, 0.0
        for done in range(every, steps + 1, every):
            t0 = time.perf_counter()
            state, losses = compiled.chunk(state, frozen, data["tokens"], key)
            last_train = float(losses[-1])  # waits for the chunk
            train_s += time.perf_counter() - t0
            val, aux = compiled.evaluate(state["params"], frozen, data["eval_x"], data["eval_y"])
            val = float(val)
            if not (math.isfinite(val) and math.isfinite(last_train)):
                raise train.TrainingDiverged(
                    f"{name} seed {seed}: loss became {last_train} (val {val}) at step {done}: lower --learning_rate"
                )
            curve.append({"step": done, "val_loss": val})
            console(
                f"  {name} seed {seed} step {done}/{steps}: train {last_train:.4f}, val {val:.4f}, "
                f"{1e3 * train_s / done:.1f} ms/step"
            )
        effective = lora.merge(start, state["params"], lcfg) if lcfg else state["params"]
        record = {
            "val_loss": curve[-1]["val_loss"],
            "curve": curve,
            "ms_per_step": 1e3 * train_s / steps,
            "compile_s": compiled.compile_s,
            "trainable_params": model.count_params(state["params"]),
            **describe(cfg, effective),
        }
        if cfg.n_experts:
            fraction_LE = np.asarray(aux["expert_fraction_LE"])
            record.update(
                expert_fraction_min=float(fraction_LE.min()),
                expert_fraction_max=float(fraction_LE.max()),
                expert_fraction_LE=fraction_LE.tolist(),
                dropped_fraction=float(aux["dropped_fraction"]),
            )
        return record, effective

    def evaluate_only(self, cfg: ModelConfig, tc: TrainConfig, params: Any, data: dict) -> dict:
        """ft_none: the pretrained model on the fine-tuning corpus, no step taken."""
        compiled = self.compiled(cfg, tc, None, data, None)
        val = float(compiled.evaluate(params, None, data["eval_x"], data["eval_y"])[0])
        return {
            "val_loss": val,
            "curve": [{"step": 0, "val_loss": val}],
            "ms_per_step": None,
            "compile_s": 0.0,
            "trainable_params": 0,
            **describe(cfg, params),
        }


def compile_arm(cfg: ModelConfig, tc: TrainConfig, lcfg: lora.LoRAConfig | None, data: dict, frozen: Any) -> Compiled:
    """Compile the training chunk and evaluation of a model, or of LoRA adapters over the `frozen` base."""
    start = time.perf_counter()
    optimizer = make_optimizer(tc, lora.adapter_axes(cfg, lcfg) if lcfg else model.param_axes(cfg))
    B, T = tc.batch_size, cfg.block_size

    def init_params(key: jax.Array, frozen: Any) -> Any:
        return lora.init_adapters(frozen, cfg, lcfg, key) if lcfg else model.init(cfg, key)

    def init_state(params: Any) -> train.State:
        return {"step": jnp.int32(0), "params": params, "opt_state": optimizer.init(params)}

    def chunk(state: train.State, frozen: Any, tokens: jax.Array, key: jax.Array) -> tuple[train.State, jax.Array]:
        # Built inside the trace: the frozen base is an argument of the compiled chunk, not a baked-in constant.
        step_fn = train.make_train_step(lora.lm_loss(frozen, cfg, lcfg) if lcfg else train.lm_loss(cfg), optimizer)

        def body(state: train.State, _: None) -> tuple[train.State, jax.Array]:
            x_BT, y_BT = data_lib.device_batch_for_step(tokens, key, state["step"], B, T)
            state, metrics = step_fn(state, {"x": x_BT[None], "y": y_BT[None]}, key)
            return state, metrics["loss"]

        return jax.lax.scan(body, state, None, length=FLAGS.eval_every)

    def evaluate(params: Any, frozen: Any, x_NBT: jax.Array, y_NBT: jax.Array) -> tuple[jax.Array, dict]:
        p = lora.merge(frozen, params, lcfg) if lcfg else params

        def one(xy: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, dict]:
            if cfg.n_experts:
                logits, aux = model.apply(p, xy[0], cfg, return_aux=True)
                aux = {k: aux[k] for k in ("expert_fraction_LE", "dropped_fraction")}
            else:
                logits, aux = model.apply(p, xy[0], cfg), {}
            return model.cross_entropy(logits, xy[1]), aux

        losses, aux = jax.lax.map(one, (x_NBT, y_NBT))
        return losses.mean(), jax.tree.map(lambda a: a.mean(0), aux)

    key = jax.random.key(0, impl=KEY_IMPL)
    state = jax.eval_shape(lambda: init_state(init_params(key, frozen)))
    chunk_c = jax.jit(chunk, donate_argnums=0).lower(state, frozen, data["tokens"], key).compile()
    eval_c = jax.jit(evaluate).lower(state["params"], frozen, data["eval_x"], data["eval_y"]).compile()
    return Compiled(jax.jit(init_params), jax.jit(init_state), chunk_c, eval_c, time.perf_counter() - start)


def describe(cfg: ModelConfig, params: Any) -> dict:
    return {
        "params": model.count_params(params),
        "active_params": int(model.count_active_params(params, cfg)),
        "kv_bytes_per_token": int(model.kv_cache_bytes_per_token(cfg)),
        "decode_cache_bytes": decode_cache_bytes(cfg),
    }


def decode_cache_bytes(cfg: ModelConfig) -> dict[str, int]:
    """Bytes of the cache `llmjax.generate` allocates to decode N tokens of one sequence, for a few N (shapes only)."""
    out = {}
    for n in DECODE_LENGTHS:
        cache = jax.eval_shape(lambda n=n: model.init_cache(cfg, 1, n))
        out[str(n)] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    return out


# ------------------------------------------------------------------------------------------------ the plan


def train_config(steps: int, weight_decay: float = 0.1) -> TrainConfig:
    return TrainConfig(
        batch_size=FLAGS.batch_size,
        max_iters=steps,
        learning_rate=FLAGS.learning_rate,
        min_lr=FLAGS.learning_rate / 10,
        warmup_iters=min(100, steps // 10),
        weight_decay=weight_decay,
        beta2=0.99,
        grad_clip=1.0,
    ).validate()


def load_data(source: str, tokenizer: str) -> dict:
    """The train tokens on device and the fixed held-out batches (their own seed, the same for every arm)."""
    dataset = data_lib.prepare_data(source, tokenizer, cache_dir=FLAGS.data_cache)
    batches = [
        data_lib.batch_for_step(
            dataset.val_tokens, seed=12345, step=i, batch_size=FLAGS.batch_size, block_size=FLAGS.block_size
        )
        for i in range(FLAGS.eval_batches)
    ]
    return {
        "tokens": jnp.asarray(np.asarray(dataset.train_tokens)),
        "eval_x": jnp.asarray(np.stack([b[0] for b in batches])),
        "eval_y": jnp.asarray(np.stack([b[1] for b in batches])),
        "vocab": dataset.tokenizer.vocab_size,
        "sha": dataset.meta["content_sha256"],
        "source": source,
    }


class Cache:
    """Finished (arm, seed) records in workdir/runs/<arm>-seed<k>.json, valid while their hash matches."""

    def __init__(self, workdir: str) -> None:
        self.dir = Path(workdir)
        (self.dir / "runs").mkdir(parents=True, exist_ok=True)
        (self.dir / "pretrained").mkdir(parents=True, exist_ok=True)

    def path(self, arm: str, seed: int) -> Path:
        return self.dir / "runs" / f"{arm}-seed{seed}.json"

    def get(self, arm: str, seed: int, key: str) -> dict | None:
        path = self.path(arm, seed)
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        return record if record.get("hash") == key else None

    def put(self, arm: str, seed: int, key: str, record: dict) -> None:
        _write_json(self.path(arm, seed), {**record, "hash": key})


def run_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_params(path: Path, params: Any) -> None:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})
    os.replace(tmp, path)


def load_params(path: Path, cfg: ModelConfig) -> Any:
    abstract = _abstract_params(cfg)
    with np.load(path) as f:
        paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
        return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(f[jax.tree_util.keystr(k)]) for k, _ in paths])


def run_pretraining_arms(
    runner: Runner, arms: list[str], seeds: list[int], cache: Cache, base: dict
) -> dict[str, list[dict]]:
    data = load_data(FLAGS.data, "char")
    tc = train_config(FLAGS.steps)
    results: dict[str, list[dict]] = {}
    for arm in arms:
        cfg = arm_config(arm, data["vocab"], FLAGS.block_size, base, FLAGS.moe_capacity_factor)
        results[arm] = []
        for seed in seeds:
            key = run_hash(
                arm,
                dataclasses.asdict(cfg),
                dataclasses.asdict(tc),
                seed,
                data["sha"],
                FLAGS.eval_batches,
                FLAGS.eval_every,
            )
            record = cache.get(arm, seed, key)
            if record is None:
                console(f"{arm} seed {seed}: training {FLAGS.steps} steps")
                record, _ = runner.train(arm, cfg, tc, seed, data)
                cache.put(arm, seed, key, record)
            else:
                console(f"{arm} seed {seed}: cached, val {record['val_loss']:.4f}")
            results[arm].append({**record, "seed": seed})
    return results


def run_finetuning_arms(
    runner: Runner, arms: list[str], seeds: list[int], cache: Cache, base: dict
) -> dict[str, list[dict]]:
    source = load_data(FLAGS.data, "byte")
    target = load_data(FLAGS.finetune_data, "byte")
    cfg = arm_config("llama", 256, FLAGS.block_size, base)
    # No weight decay while fine-tuning, for every arm: decaying LoRA's factors A and B is not decaying A·B, and
    # llmjax.optim's mask (matrices touching the model width) would decay only one factor of each pair.
    pre_tc, ft_tc = train_config(FLAGS.steps), train_config(FLAGS.finetune_steps, weight_decay=0.0)
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    for seed in seeds:
        pre_key = run_hash(
            "bytes_pretrain",
            dataclasses.asdict(cfg),
            dataclasses.asdict(pre_tc),
            seed,
            source["sha"],
            FLAGS.eval_batches,
            FLAGS.eval_every,
        )
        params_path = cache.dir / "pretrained" / f"bytes-seed{seed}-{pre_key}.npz"
        record = cache.get("bytes_pretrain", seed, pre_key)
        if record is None or not params_path.exists():
            console(f"bytes_pretrain seed {seed}: training {FLAGS.steps} steps on {FLAGS.data}")
            record, pretrained = runner.train("bytes_pretrain", cfg, pre_tc, seed, source)
            save_params(params_path, pretrained)
            cache.put("bytes_pretrain", seed, pre_key, record)
        pretrained = load_params(params_path, cfg)
        if "bytes_pretrain" in results:
            results["bytes_pretrain"].append({**record, "seed": seed})
        for arm in arms:
            if arm == "bytes_pretrain":
                continue
            lcfg = None
            if arm in LORA_ARMS:
                rank, targets = LORA_ARMS[arm]
                lcfg = lora.LoRAConfig(rank=rank, alpha=FLAGS.lora_alpha, targets=targets).validate()
            key = run_hash(
                arm,
                pre_key,
                dataclasses.asdict(ft_tc),
                lcfg and dataclasses.asdict(lcfg),
                target["sha"],
                FLAGS.eval_batches,
                FLAGS.eval_every,
            )
            record = cache.get(arm, seed, key)
            if record is None:
                console(f"{arm} seed {seed}: fine-tuning {FLAGS.finetune_steps} steps on {FLAGS.finetune_data}")
                if arm == "ft_none":
                    record = runner.evaluate_only(cfg, ft_tc, pretrained, target)
                else:
                    start = None if arm == "ft_scratch" else pretrained
                    record, _ = runner.train(arm, cfg, ft_tc, seed, target, start=start, lcfg=lcfg)
                cache.put(arm, seed, key, record)
            else:
                console(f"{arm} seed {seed}: cached, val {record['val_loss']:.4f}")
            results[arm].append({**record, "seed": seed})
    return results


# ------------------------------------------------------------------------------------------------- summary


def summarize_arm(arm: str, records: list[dict]) -> dict:
    first = records[0]
    steps = [p["step"] for p in first["curve"]]
    curve = [
        {"step": s, "val_loss": float(np.mean([r["curve"][i]["val_loss"] for r in records]))}
        for i, s in enumerate(steps)
    ]
    ms = [r["ms_per_step"] for r in records if r["ms_per_step"] is not None]
    out = {
        "stage": "pretrain" if arm in PRETRAIN_ARMS else "finetune",
        "val_loss": float(np.mean([r["val_loss"] for r in records])),
        "val_loss_per_seed": [r["val_loss"] for r in records],
        "seeds": [r["seed"] for r in records],
        "params": first["params"],
        "active_params": first["active_params"],
        "trainable_params": first["trainable_params"],
        "trainable_fraction": first["trainable_params"] / first["params"],
        "kv_bytes_per_token": first["kv_bytes_per_token"],
        "decode_cache_bytes": first["decode_cache_bytes"],
        "ms_per_step": float(np.mean(ms)) if ms else None,
        "curve": curve,
    }
    if "expert_fraction_min" in first:
        out.update(
            expert_fraction_min=min(r["expert_fraction_min"] for r in records),
            expert_fraction_max=max(r["expert_fraction_max"] for r in records),
            dropped_fraction=max(r["dropped_fraction"] for r in records),
        )
    return out


def checks(arms: dict) -> dict:
    """The claims checked here, each with the measured value and whether it is met (only for arms that ran)."""
    out: dict[str, dict] = {}

    def have(*names: str) -> bool:
        return all(n in arms for n in names)

    def per_seed_diff(a: str, b: str) -> list[float]:
        return [x - y for x, y in zip(arms[a]["val_loss_per_seed"], arms[b]["val_loss_per_seed"], strict=True)]

    if have("gpt2", "llama"):
        gain = arms["gpt2"]["val_loss"] - arms["llama"]["val_loss"]
        out["llama_beats_gpt2"] = {
            "value": gain,
            "per_seed": [-d for d in per_seed_diff("llama", "gpt2")],
            "params": [arms["gpt2"]["params"], arms["llama"]["params"]],
            "target": ">= 0.15 nats",
            "met": gain >= 0.15,
        }
    for arm, tol, ratio in (("gqa", 0.03, 0.5), ("mqa", 0.05, 0.25)):
        if have(arm, "llama"):
            diff = arms[arm]["val_loss"] - arms["llama"]["val_loss"]
            kv = arms[arm]["kv_bytes_per_token"] / arms["llama"]["kv_bytes_per_token"]
            out[f"{arm}_vs_mha"] = {
                "value": diff,
                "per_seed": per_seed_diff(arm, "llama"),
                "kv_ratio": kv,
                "target": f"<= +{tol} nats, kv ratio exactly {ratio}",
                "met": diff <= tol and kv == ratio,
            }
    if have("moe", "llama"):
        moe = arms["moe"]
        gain = arms["llama"]["val_loss"] - moe["val_loss"]
        time_ratio = moe["ms_per_step"] / arms["llama"]["ms_per_step"]
        moe["dispatch_overhead_ms"] = moe["ms_per_step"] - arms["llama"]["ms_per_step"]
        util = (moe["expert_fraction_min"], moe["expert_fraction_max"])
        out["moe_vs_dense"] = {
            "value": gain,
            "per_seed": [-d for d in per_seed_diff("moe", "llama")],
            "active_params": [moe["active_params"], arms["llama"]["active_params"]],
            "step_time_ratio": time_ratio,
            "expert_fraction_range": util,
            "dropped_fraction": moe["dropped_fraction"],
            "target": ">= 0.01 nats better, utilisation in [0.08, 0.17], dropped <= 2%, step time <= 2x",
            "met": gain >= 0.01
            and 0.08 <= util[0]
            and util[1] <= 0.17
            and moe["dropped_fraction"] <= 0.02
            and time_ratio <= 2.0,
        }
    if have("window", "llama"):
        diff = arms["window"]["val_loss"] - arms["llama"]["val_loss"]
        rolling = arms["window"]["decode_cache_bytes"]
        out["window_vs_full"] = {
            "value": diff,
            "per_seed": per_seed_diff("window", "llama"),
            "decode_cache_bytes": rolling,
            "full_attention_decode_cache_bytes": arms["llama"]["decode_cache_bytes"],
            "target": "<= +0.03 nats, rolling-cache memory constant in the generated length",
            "met": diff <= 0.03 and len(set(rolling.values())) == 1,
        }
    if have("mla", "llama"):
        diff = arms["mla"]["val_loss"] - arms["llama"]["val_loss"]
        shrink = arms["llama"]["kv_bytes_per_token"] / arms["mla"]["kv_bytes_per_token"]
        out["mla_vs_mha"] = {
            "value": diff,
            "per_seed": per_seed_diff("mla", "llama"),
            "kv_shrink": shrink,
            "target": "<= +0.08 nats, kv cache >= 4x smaller",
            "met": diff <= 0.08 and shrink >= 4,
        }
    if have("ft_none", "ft_full"):
        none, full = arms["ft_none"]["val_loss"], arms["ft_full"]["val_loss"]
        for arm in ("lora_all_r4", "lora_all_r16", "lora_qv_r16", "ft_scratch"):
            if arm in arms:
                closed = (none - arms[arm]["val_loss"]) / (none - full)
                entry = {"value": closed, "trainable_fraction": arms[arm]["trainable_fraction"]}
                if arm == "lora_all_r4":
                    entry.update(
                        target=">= 0.85 of the gap closed with < 5% trainable",
                        met=closed >= 0.85 and arms[arm]["trainable_fraction"] < 0.05,
                    )
                out[f"{arm}_gap_closed"] = entry
        if "ft_scratch" in arms and "lora_all_r4" in arms:
            out["scratch_vs_lora_all_r4"] = {
                "value": arms["ft_scratch"]["val_loss"] - arms["lora_all_r4"]["val_loss"],
                "note": "negative: training from scratch beat LoRA at this scale",
            }
    return out


def write_outputs(workdir: Path, arms: dict, wall_s: float, base: dict) -> dict:
    summary = {
        "arms": arms,
        "checks": checks(arms),
        "config": {
            "model": base,
            "steps": FLAGS.steps,
            "finetune_steps": FLAGS.finetune_steps,
            "batch_size": FLAGS.batch_size,
            "block_size": FLAGS.block_size,
            "learning_rate": FLAGS.learning_rate,
            "lora_alpha": FLAGS.lora_alpha,
            "moe_capacity_factor": FLAGS.moe_capacity_factor,
            "data": FLAGS.data,
            "finetune_data": FLAGS.finetune_data,
            "eval_batches": FLAGS.eval_batches,
            "eval_every": FLAGS.eval_every,
        },
        "wall_time_s": wall_s,
    }
    _write_json(workdir / "summary.json", summary)
    plot(workdir / "curves.png", arms)
    print_table(arms, summary["checks"])
    return summary


def plot(path: Path, arms: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, stage, title in (
        (axes[0], "pretrain", f"pretraining, char-level ({FLAGS.data})"),
        (axes[1], "finetune", f"fine-tuning, byte-level ({FLAGS.finetune_data})"),
    ):
        for name, arm in arms.items():
            if arm["stage"] != stage or name == "bytes_pretrain" or len(arm["curve"]) < 2:
                continue
            curve = [p for p in arm["curve"] if p["step"] > 0]
            ax.plot([p["step"] for p in curve], [p["val_loss"] for p in curve], label=name)
        if stage == "finetune" and "ft_none" in arms:
            ax.axhline(arms["ft_none"]["val_loss"], color="gray", ls="--", label="ft_none")
        ax.set(title=title, xlabel="step", ylabel="val loss (nats/token), mean over seeds")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(arms: dict, found: dict) -> None:
    console(
        f"{'arm':<15} {'val loss per seed':<20} {'mean':>7} {'params':>9} {'active':>9} {'trainable':>10} "
        f"{'kv B/tok':>9} {'ms/step':>8}"
    )
    for name, a in arms.items():
        seeds = ", ".join(f"{v:.4f}" for v in a["val_loss_per_seed"])
        ms = f"{a['ms_per_step']:.1f}" if a["ms_per_step"] is not None else "-"
        console(
            f"{name:<15} {seeds:<20} {a['val_loss']:>7.4f} {a['params']:>9,} {a['active_params']:>9,} "
            f"{a['trainable_params']:>10,} {a['kv_bytes_per_token']:>9,} {ms:>8}"
        )
    for name, c in found.items():
        met = "" if "met" not in c else (" met" if c["met"] else " NOT met")
        console(f"check {name}: {c['value']:+.4f}{met}" + (f" (target {c['target']})" if "target" in c else ""))


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------ main


def resolve_flags() -> tuple[list[str], list[int], dict]:
    """Apply --smoke, check the flags: (arms, seeds, base model fields)."""
    if FLAGS.smoke:
        for name, value in SMOKE.items():
            if not FLAGS[name].present:
                FLAGS[name].value = value
        if not FLAGS["data"].present:
            FLAGS.data = "pystdlib"
        if not FLAGS["finetune_data"].present:
            FLAGS.finetune_data = f"text:{REPO / 'README.md'}"
    known = PRETRAIN_ARMS + FINETUNE_ARMS
    arms = list(known) if FLAGS.arms == ["all"] else FLAGS.arms
    unknown = [a for a in arms if a not in known]
    if unknown or not arms:
        raise UserError(
            f"unknown arm(s) {', '.join(unknown) or '(none)'}: use --arms=all or names from {', '.join(known)}"
        )
    try:
        seeds = [int(s) for s in FLAGS.seeds]
    except ValueError:
        raise UserError(f"--seeds={','.join(FLAGS.seeds)} must be a comma list of integers") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise UserError("--seeds must list distinct non-negative integers, e.g. --seeds=0,1")
    for name in ("steps", "finetune_steps", "eval_every", "eval_batches", "batch_size", "block_size", "workers"):
        if FLAGS[name].value < 1:
            raise UserError(f"--{name}={FLAGS[name].value} must be a positive integer")
    if FLAGS.steps % FLAGS.eval_every or FLAGS.finetune_steps % FLAGS.eval_every:
        raise UserError(
            f"--eval_every={FLAGS.eval_every} must divide --steps={FLAGS.steps} and "
            f"--finetune_steps={FLAGS.finetune_steps}"
        )
    if FLAGS.moe_capacity_factor <= 0:
        raise UserError(f"--moe_capacity_factor={FLAGS.moe_capacity_factor} must be > 0 (1.25 is usual)")
    if FLAGS.block_size % 4:
        raise UserError(f"--block_size={FLAGS.block_size} must be a multiple of 4 (the window arm uses a quarter)")
    return arms, seeds, SMOKE_BASE if FLAGS.smoke else BASE


def run_workers(seeds: list[int]) -> None:
    """Train the seeds in --workers child processes, one XLA thread each; their results land in the cache.

    Tiny models leave much of a second core idle (small ops, one thread each), so two single-threaded processes
    get more steps per second out of a 2-core machine than one process using both.
    """
    groups = [seeds[i :: FLAGS.workers] for i in range(min(FLAGS.workers, len(seeds)))]
    forwarded = ["--smoke" if FLAGS.smoke else "--nosmoke"] + [
        f"--{name}={','.join(value) if isinstance(value, list) else value}"
        for name, value in ((n, FLAGS[n].value) for n in OWN_FLAGS)
        if name not in ("seeds", "workers", "smoke") and value is not None
    ]
    env = {
        **os.environ,
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=1 "
        "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1".strip(),
    }
    console(f"training seeds {groups} in {len(groups)} worker processes")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "experiments.architectures",
                *forwarded,
                "--workers=1",
                "--worker",
                f"--seeds={','.join(map(str, g))}",
            ],
            env=env,
        )
        for g in groups
    ]
    failed = [g for g, p in zip(groups, procs, strict=True) if p.wait() != 0]
    if failed:
        raise RuntimeError(f"worker(s) for seeds {failed} failed; rerun to resume from the cached arms")


def run() -> dict:
    start = time.perf_counter()
    arms, seeds, base = resolve_flags()
    workdir = Path(FLAGS.workdir)
    cache = Cache(str(workdir))
    if FLAGS.workers > 1 and len(seeds) > 1:
        run_workers(seeds)
    console(
        f"architectures: arms {', '.join(arms)}; seeds {seeds}; {FLAGS.steps} pretraining / "
        f"{FLAGS.finetune_steps} fine-tuning steps × batch {FLAGS.batch_size} × context {FLAGS.block_size}"
    )
    records: dict[str, list[dict]] = {}
    runner = Runner()
    pre = [a for a in PRETRAIN_ARMS if a in arms]
    if pre:
        records.update(run_pretraining_arms(runner, pre, seeds, cache, base))
    fine = [a for a in FINETUNE_ARMS if a in arms]
    if fine:
        records.update(run_finetuning_arms(runner, fine, seeds, cache, base))
    if FLAGS.worker:
        return {}
    summary_arms = {arm: summarize_arm(arm, records[arm]) for arm in PRETRAIN_ARMS + FINETUNE_ARMS if arm in records}
    return write_outputs(workdir, summary_arms, time.perf_counter() - start, base)


def main() -> None:
    if FLAGS.smoke:  # before JAX's backend starts: compiling a dozen programs dominates the smoke run, and without
        # LLVM's optimisations it takes half the time (the tiny steps run slower, but they are not the cost)
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    run()


if __name__ == "__main__":
    app.run(absl_main(main))
