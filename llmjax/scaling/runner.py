"""Run a sweep resumably: each run is keyed by the hash of its resolved `RunSpec`, results go to one JSONL file.

- A finished hash (ok or failed) is skipped, so a killed sweep rerun with the same plan trains only what is missing
  and, runs being deterministic, ends with the same records and the same summary.
- `ResultStore.append` rewrites the file through a temporary file and `os.replace`: a kill leaves the old or the
  new file, never a torn line.
- A run that raises (divergence, out of memory, ...) is recorded as failed with its error; the sweep goes on.

Training: one compiled `lax.scan` chunk of `chunk_steps` optimizer steps per model shape, with the batch of step s
sampled on device from (seed, s) and the learning rate a traced input, so every budget and learning rate of a width
reuses one compilation and tiny models are not dominated by Python dispatch.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llmjax import data as data_lib
from llmjax import model, sharding, train
from llmjax.config import ModelConfig
from llmjax.optim import decay_mask
from llmjax.scaling import accounting
from llmjax.scaling.plan import LrLaw, RunSpec, SweepConfig, Throughput, fit_throughput, make_run

Record = dict[str, Any]
TrainFn = Callable[[RunSpec], Record]


# ------------------------------------------------------------------------------------------------------ results


class ResultStore:
    """The sweep's results: one JSON record per line in `path`, keyed by run hash."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> dict[str, Record]:
        if not os.path.exists(self.path):
            return {}
        with open(self.path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        return {r["hash"]: r for r in records}

    def append(self, record: Record) -> None:
        """Atomically add one record: the file is replaced whole, so readers never see a partial line.

        An exclusive lock on a sibling `.lock` file serialises writers, so parallel workers never lose a record.
        """
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        with open(self.path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            old = open(self.path, encoding="utf-8").read() if os.path.exists(self.path) else ""
            fd, tmp = tempfile.mkstemp(prefix=".results-", dir=directory)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(old + json.dumps(record, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)


def run_all(
    specs: Iterable[RunSpec],
    store: ResultStore,
    train_fn: TrainFn,
    *,
    log: Callable[[str], None] = print,
    retry_failed: bool = False,
) -> dict[str, Record]:
    """Train every spec whose hash has no record yet; failures are recorded, not raised. Returns hash -> record."""
    done = store.load()
    specs = list(specs)
    for i, spec in enumerate(specs):
        h = spec.run_hash()
        if h in done and (done[h]["status"] == "ok" or not retry_failed):
            continue
        start = time.perf_counter()
        try:
            record = {"status": "ok", **train_fn(spec)}
        except Exception as e:  # noqa: BLE001 -- any failure of one run is recorded and the sweep continues
            record = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                      "traceback": traceback.format_exc(limit=5)}
        record.update(hash=h, spec=dataclasses.asdict(spec), run_wall_s=time.perf_counter() - start)
        store.append(record)
        done[h] = record
        loss = f"loss {record['final_loss']:.4f}" if record["status"] == "ok" else record["error"]
        log(f"[{i + 1}/{len(specs)}] {spec.kind} C={spec.budget:.1e} d={spec.width} lr={spec.peak_lr:.2e} "
            f"{spec.steps} steps: {loss} ({record['run_wall_s']:.1f}s)")
    return done


def split_for_workers(specs: list[RunSpec], seconds: list[float], workers: int) -> list[list[RunSpec]]:
    """Whole widths (so each is compiled by one worker only), longest first to the least-loaded worker (LPT)."""
    by_width: dict[int, list[int]] = {}
    for i, s in enumerate(specs):
        by_width.setdefault(s.width, []).append(i)
    shares: list[list[RunSpec]] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for group in sorted(by_width.values(), key=lambda g: -sum(seconds[i] for i in g)):
        w = loads.index(min(loads))
        shares[w] += [specs[i] for i in group]
        loads[w] += sum(seconds[i] for i in group)
    return shares


# ------------------------------------------------------------------------------------------------------ training


def lr_at(step: jax.Array, peak_lr: jax.Array, warmup: jax.Array, total: jax.Array, min_ratio: jax.Array) -> jax.Array:
    """Linear warmup to `peak_lr`, then cosine decay to `min_ratio·peak_lr` exactly at the run's last step.

    The same shape as `llmjax.optim.learning_rate`, but with traced arguments so one compiled chunk serves every
    run length and learning rate.
    """
    step = step.astype(jnp.float32)
    warm = peak_lr * (step + 1) / (warmup + 1)
    progress = jnp.clip((step - warmup) / jnp.maximum(total - 1 - warmup, 1), 0.0, 1.0)
    cosine = peak_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress)))
    return jnp.where(step < warmup, warm, cosine)


def make_optimizer(cfg: ModelConfig, spec: RunSpec) -> optax.GradientTransformation:
    """AdamW (decay on matrices) with global-norm clipping; the learning rate is a hyperparameter set every step."""
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=0.0, b1=0.9, b2=spec.beta2, weight_decay=spec.weight_decay,
        mask=decay_mask(model.param_axes(cfg)),
    )
    return optax.chain(optax.clip_by_global_norm(1.0), adamw)


def _with_lr(opt_state: tuple, lr: jax.Array) -> tuple:
    clip_state, adam_state = opt_state
    return clip_state, adam_state._replace(hyperparams={**adam_state.hyperparams, "learning_rate": lr})


@dataclass
class CompiledRun:
    """The jitted pieces for one (model shape, batch shape, mesh): init, a scan chunk of steps, evaluation."""

    init: Callable
    chunk: Callable
    evaluate: Callable
    compile_s: float


class Trainer:
    """Trains `RunSpec`s on one dataset and mesh, compiling once per distinct model and batch shape."""

    def __init__(self, dataset: data_lib.Dataset, mesh: jax.sharding.Mesh) -> None:
        self.mesh = mesh
        self.data_sha = dataset.meta["content_sha256"]
        self.tokens = jax.device_put(np.asarray(dataset.train_tokens), sharding.replicated(mesh))
        self.val_tokens = np.asarray(dataset.val_tokens)
        self._compiled: dict[tuple, CompiledRun] = {}

    def compiled_for(self, spec: RunSpec) -> CompiledRun:
        """The jitted pieces for `spec`'s shapes, compiled on first use and cached."""
        key = (spec.model_config(), spec.batch_size, spec.chunk_steps, spec.weight_decay, spec.beta2)
        if key in self._compiled:
            return self._compiled[key]
        start = time.perf_counter()
        cfg = spec.model_config().validate()
        optimizer = make_optimizer(cfg, spec)
        step_fn = train.make_train_step(train.lm_loss(cfg), optimizer)
        B, T, K = spec.batch_size, spec.block_size, spec.chunk_steps
        rows = sharding.batch_sharding(self.mesh, ndim=2)
        state_sh = train.state_shardings(cfg, optimizer, self.mesh)
        rep = sharding.replicated(self.mesh)

        def chunk(state: train.State, tokens: jax.Array, key: jax.Array, hp: jax.Array) -> tuple:
            def body(state: train.State, _: None) -> tuple:
                x_BT, y_BT = data_lib.device_batch_for_step(tokens, key, state["step"], B, T)
                batch = {"x": jax.lax.with_sharding_constraint(x_BT, rows)[None],
                         "y": jax.lax.with_sharding_constraint(y_BT, rows)[None]}
                lr = lr_at(state["step"], hp[0], hp[1], hp[2], hp[3])
                state = {**state, "opt_state": _with_lr(state["opt_state"], lr)}
                state, metrics = step_fn(state, batch, key)
                return state, metrics["loss"]

            return jax.lax.scan(body, state, None, length=K)

        def evaluate(params: model.Params, x_NBT: jax.Array, y_NBT: jax.Array) -> jax.Array:
            losses = jax.lax.map(lambda xy: model.cross_entropy(model.apply(params, xy[0], cfg), xy[1]), (x_NBT, y_NBT))
            return losses.mean()

        compiled = CompiledRun(
            init=jax.jit(lambda k: train.new_state(cfg, optimizer, k), out_shardings=state_sh),
            chunk=jax.jit(sharding.under_mesh(chunk, self.mesh), in_shardings=(state_sh, rep, rep, rep),
                          out_shardings=(state_sh, rep), donate_argnums=0),
            evaluate=jax.jit(sharding.under_mesh(evaluate, self.mesh), in_shardings=(state_sh["params"], rep, rep)),
            compile_s=0.0,
        )
        # Compile now (not on first use) so the compile time is measured apart from the training time.
        state = compiled.init(jax.random.key(0))
        hp = jnp.zeros(4, jnp.float32)
        compiled.chunk.lower(state, self.tokens, jax.random.key(0), hp).compile()
        x = jnp.zeros((spec.eval_batches, B, T), jnp.int32)
        compiled.evaluate.lower(state["params"], x, x).compile()
        compiled.compile_s = time.perf_counter() - start
        self._compiled[key] = compiled
        return compiled

    def eval_set(self, spec: RunSpec) -> tuple[np.ndarray, np.ndarray]:
        """Fixed validation batches (their own seed stream), the same for every run of a sweep."""
        batches = [data_lib.batch_for_step(self.val_tokens, seed=spec.seed + 1, step=i, batch_size=spec.batch_size,
                                           block_size=spec.block_size) for i in range(spec.eval_batches)]
        return np.stack([x for x, _ in batches]), np.stack([y for _, y in batches])

    def __call__(self, spec: RunSpec) -> Record:
        """Train `spec` and record its validation loss at each eval step (the last is `final_loss`)."""
        compiled = self.compiled_for(spec)
        key = jax.random.key(spec.seed)
        state = compiled.init(jax.random.fold_in(key, 0))
        hp = jnp.asarray([spec.peak_lr, spec.warmup_steps, spec.steps, spec.min_lr_ratio], jnp.float32)
        eval_x, eval_y = (jax.device_put(a, sharding.replicated(self.mesh)) for a in self.eval_set(spec))
        eval_steps = set(spec.eval_steps())
        curve: list[dict[str, float]] = []
        start = time.perf_counter()
        for done in range(spec.chunk_steps, spec.steps + 1, spec.chunk_steps):
            state, train_losses = compiled.chunk(state, self.tokens, key, hp)
            if done in eval_steps:
                val = float(compiled.evaluate(state["params"], eval_x, eval_y))
                train_loss = float(train_losses[-1])
                if not (math.isfinite(val) and math.isfinite(train_loss)):
                    raise train.TrainingDiverged(f"loss became {train_loss} (val {val}) at step {done}")
                curve.append({"step": done, "fraction": done / spec.steps, "val_loss": val, "train_loss": train_loss})
        train_s = time.perf_counter() - start
        cfg = spec.model_config()
        counts = accounting.param_counts(cfg)
        return {
            "final_loss": curve[-1]["val_loss"], "curve": curve, "tokens": spec.tokens,
            "n_total": counts.total, "n_non_embedding": counts.non_embedding,
            "flops": {c: spec.flops(c) for c in accounting.CONVENTIONS},
            "train_s": train_s, "compile_s": compiled.compile_s, "data_sha256": self.data_sha,
        }


def measure_throughput(trainer: Trainer, sweep: SweepConfig, widths: Iterable[int], chunks: int = 3) -> Throughput:
    """Time `chunks` scan chunks (after a warm-up chunk) at each width and fit seconds per step against FLOPs."""
    flops_step, seconds_step, compiles = [], [], []
    for w in widths:
        spec = make_run(sweep, "throughput", sweep.budgets[0], w, sweep.prior_lr)
        compiled = trainer.compiled_for(spec)
        compiles.append(compiled.compile_s)
        state = compiled.init(jax.random.key(0))
        hp = jnp.asarray([1e-3, 10, 1000, 0.1], jnp.float32)
        state, losses = compiled.chunk(state, trainer.tokens, jax.random.key(0), hp)
        losses.block_until_ready()
        start = time.perf_counter()
        for _ in range(chunks):
            state, losses = compiled.chunk(state, trainer.tokens, jax.random.key(0), hp)
        losses.block_until_ready()
        seconds_step.append((time.perf_counter() - start) / (chunks * spec.chunk_steps))
        flops_step.append(spec.flops("attention") / spec.steps)
    return fit_throughput(flops_step, seconds_step, float(np.mean(compiles)))


# ------------------------------------------------------------------------------------------ learning-rate law


def fit_lr_law(records: Iterable[Record]) -> tuple[LrLaw, list[dict[str, float]]]:
    """lr*(N) from calibration runs: per size, the vertex of a parabola of final loss in log lr (kept inside the
    tried range), then a least-squares line log lr* = log lr_ref − γ·log(N / n_ref), γ clamped to [0, 1]."""
    by_width: dict[int, list[Record]] = {}
    for r in records:
        if r["status"] == "ok" and r["spec"]["kind"] == "lr_calibration":
            by_width.setdefault(r["spec"]["width"], []).append(r)
    optima = []
    for width in sorted(by_width):
        runs = sorted(by_width[width], key=lambda r: r["spec"]["peak_lr"])
        log_lr = np.log([r["spec"]["peak_lr"] for r in runs])
        loss = np.array([r["final_loss"] for r in runs])
        best = int(np.argmin(loss))
        lr_star = log_lr[best]
        if 0 < best < len(runs) - 1:  # refine with a parabola through the best point and its neighbours
            c2, c1, _ = np.polyfit(log_lr[best - 1 : best + 2], loss[best - 1 : best + 2], 2)
            if c2 > 0:
                lr_star = float(np.clip(-c1 / (2 * c2), log_lr[best - 1], log_lr[best + 1]))
        optima.append({"width": width, "n_total": runs[0]["n_total"], "lr_star": float(np.exp(lr_star)),
                       "loss": float(loss[best])})
    if len(optima) < 2:
        raise RuntimeError("lr calibration needs at least two sizes with finished runs")
    log_n = np.log([o["n_total"] for o in optima])
    n_ref = float(np.exp(log_n.mean()))
    log_lr = np.log([o["lr_star"] for o in optima])
    slope, _ = np.polyfit(log_n - math.log(n_ref), log_lr, 1)
    # n_ref is the centroid of log N, so the line (with γ clamped or not) passes through mean(log lr*) there.
    return LrLaw(lr_ref=float(np.exp(log_lr.mean())), n_ref=n_ref, gamma=float(np.clip(-slope, 0.0, 1.0))), optima
