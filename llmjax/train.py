"""The training machinery shared by every experiment: state, one pure train step, evaluation, the loop.

Pretraining, SFT, reward modelling, DPO, PPO and GRPO differ only in `loss_fn(params, batch, key) -> (loss, aux)`
and in the batch; `make_train_step` turns any such loss into a jitted, sharded, donated update with gradient
accumulation, so optimizer, sharding, checkpointing and logging are written once.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llmjax import distributed, model, sharding
from llmjax.checkpoint import Checkpointer, check_compatible
from llmjax.config import ModelConfig, TrainConfig
from llmjax.errors import TrainingDiverged
from llmjax.metrics import MetricsWriter, console
from llmjax.optim import learning_rate

State = dict[str, Any]  # {"step": int32[], "params": Params, "opt_state": optax state}
Batch = dict[str, jax.Array]
LossFn = Callable[[model.Params, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]

# Fields that only change how the same parameters are computed: a checkpoint may resume with other values.
RUNTIME_FIELDS = (
    "scan_layers", "remat", "compute_dtype", "attention", "matmul", "dropout",
    "capacity_factor", "moe_aux_coef", "router_z_coef",
)


def lm_loss(cfg: ModelConfig) -> LossFn:
    """Next-token cross-entropy on batch["x"] -> batch["y"] (optionally masked by batch["mask"]).

    A mixture-of-experts model adds moe_aux_coef · load-balancing loss + router_z_coef · router z-loss to the
    objective. They enter as `a - stop_gradient(a)`, so the returned value stays the cross-entropy (train and eval
    losses compare directly with a dense model's) while the gradient carries them; the aux dict reports both terms
    and the fraction of dropped expert choices.
    """

    def loss_fn(params: model.Params, batch: Batch, key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        logits_BTV, aux = model.apply(
            params, batch["x"], cfg, dropout_key=key if cfg.dropout > 0 else None, return_aux=True
        )
        loss = model.cross_entropy(logits_BTV, batch["y"], batch.get("mask"))
        if not cfg.n_experts:
            return loss, {}
        penalty = cfg.moe_aux_coef * aux["moe_aux_loss"] + cfg.router_z_coef * aux["router_z_loss"]
        metrics = {name: aux[name] for name in ("moe_aux_loss", "router_z_loss", "dropped_fraction")}
        return loss + penalty - jax.lax.stop_gradient(penalty), metrics

    return loss_fn


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation) -> Callable:
    """train_step(state, batch, key) -> (state, metrics); every batch leaf has a leading micro-batch axis A.

    Gradients are averaged over the A micro-batches inside a `lax.scan`, so memory is that of one micro-batch.
    The dropout key of step s is fold_in(key, s): resuming at s draws the same masks as an uninterrupted run.
    """

    def train_step(state: State, batch: Batch, key: jax.Array) -> tuple[State, dict[str, jax.Array]]:
        step_key = jax.random.fold_in(key, state["step"])
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def accumulate(carry: tuple, micro: tuple) -> tuple:
            grads_sum, loss_sum = carry
            micro_batch, index = micro
            (loss, aux), grads = grad_fn(state["params"], micro_batch, jax.random.fold_in(step_key, index))
            return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss), aux

        n_micro = jax.tree.leaves(batch)[0].shape[0]
        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        (grads, loss), aux_A = jax.lax.scan(accumulate, (zeros, 0.0), (batch, jnp.arange(n_micro)))
        grads = jax.tree.map(lambda g: g / n_micro, grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # The loss's own statistics (e.g. MoE routing), averaged over the micro-batches.
        metrics = {**jax.tree.map(jnp.mean, aux_A), "loss": loss / n_micro, "grad_norm": optax.tree.norm(grads)}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return train_step


def state_shardings(cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> Any:
    """Shardings of the whole train state; optimizer moments take their parameter's sharding."""
    abstract = jax.eval_shape(lambda: new_state(cfg, optimizer, jax.random.key(0)))
    param_sh = sharding.param_shardings(cfg, abstract["params"], model.param_axes(cfg), mesh)
    opt_sh = optax.tree_map_params(
        optimizer, lambda _, sh: sh, abstract["opt_state"], param_sh,
        transform_non_params=lambda _: sharding.replicated(mesh),
    )
    return {"step": sharding.replicated(mesh), "params": param_sh, "opt_state": opt_sh}


def new_state(cfg: ModelConfig, optimizer: optax.GradientTransformation, key: jax.Array) -> State:
    params = model.init(cfg, key)
    return {"step": jnp.int32(0), "params": params, "opt_state": optimizer.init(params)}


@dataclass
class Trainer:
    """A compiled train step and eval step for one (model, loss, optimizer, mesh); builds and feeds batches."""

    cfg: ModelConfig
    tc: TrainConfig
    mesh: jax.sharding.Mesh
    loss_fn: LossFn
    optimizer: optax.GradientTransformation

    def __post_init__(self) -> None:
        sharding.check_batch_divides(self.tc.batch_size // self.tc.grad_accum, self.mesh)
        self.shardings = state_shardings(self.cfg, self.optimizer, self.mesh)
        self.batch_sharding = sharding.batch_sharding(self.mesh, ndim=3, batch_axis=1)
        self.eval_batch_sharding = sharding.batch_sharding(self.mesh, ndim=2)
        self.key = jax.random.key(self.tc.seed)
        # Traced under the mesh so the model's sharding.constrain calls pin activation layouts.
        step = sharding.under_mesh(make_train_step(self.loss_fn, self.optimizer), self.mesh)
        self._step = jax.jit(
            step,
            in_shardings=(self.shardings, self.batch_sharding, sharding.replicated(self.mesh)),
            out_shardings=(self.shardings, sharding.replicated(self.mesh)),
            donate_argnums=0,
        )
        self._eval = jax.jit(
            sharding.under_mesh(lambda params, batch: self.loss_fn(params, batch, self.key)[0], self.mesh),
            in_shardings=(self.shardings["params"], self.eval_batch_sharding),
        )
        self._init = jax.jit(
            lambda key: new_state(self.cfg, self.optimizer, key), out_shardings=self.shardings
        )
        self.compiled_step: Any = None

    def init_state(self) -> State:
        """Parameters created directly in their shards: no device ever holds the full unsharded model."""
        return self._init(jax.random.fold_in(self.key, 0))

    def abstract_state(self) -> State:
        shapes = jax.eval_shape(lambda: new_state(self.cfg, self.optimizer, self.key))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.shardings)

    def put_batch(self, batch: dict[str, np.ndarray]) -> Batch:
        """This process's rows [B_local, T] of the global batch -> a global array [A, B/A, T] sharded over devices."""
        A = self.tc.grad_accum

        def put(x: np.ndarray) -> jax.Array:
            x = x.reshape(A, x.shape[0] // A, *x.shape[1:])
            return jax.make_array_from_process_local_data(self.batch_sharding, x)

        return {k: put(v) for k, v in batch.items()}

    def compile(self, state: State, batch: Batch) -> float:
        """Compile the train step ahead of time; returns the seconds it took."""
        start = time.perf_counter()
        self.compiled_step = self._step.lower(state, batch, self.key).compile()
        return time.perf_counter() - start

    def step(self, state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        return self.compiled_step(state, batch, self.key)

    def eval_loss(self, params: model.Params, batches: list[dict[str, np.ndarray]]) -> float:
        # float() waits for each batch: queued multi-device CPU computations can deadlock XLA's collectives.
        losses = [
            float(self._eval(params, {k: jax.make_array_from_process_local_data(self.eval_batch_sharding, v)
                                      for k, v in b.items()}))
            for b in batches
        ]
        return float(np.mean(losses))


def resumable_keys(cfg: ModelConfig) -> tuple[str, ...]:
    """The meta keys a checkpoint must share with the current run: every model field that shapes the parameters."""
    return tuple(f"model.{f.name}" for f in dataclasses.fields(cfg) if f.name not in RUNTIME_FIELDS)


def config_defaults(cfg: ModelConfig) -> dict[str, Any]:
    """`model.<field>` -> default value, for checkpoints written before a field existed."""
    return {f"model.{f.name}": f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step, so it can checkpoint and exit cleanly."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_loop(
    trainer: Trainer,
    *,
    workdir: str,
    batch_fn: Callable[[int], dict[str, np.ndarray]],
    eval_sets: dict[str, list[dict[str, np.ndarray]]],
    meta: dict[str, Any],
    flops_per_step: float | None = None,
    peak_flops: float | None = None,
) -> tuple[State, dict[str, Any]]:
    """Train from the latest checkpoint in `workdir` (or from scratch) to `max_iters`: (final state, summary).

    `batch_fn(step)` gives this process's rows of the batch for `step`, a pure function of the step, so a resumed
    run sees exactly the batches the uninterrupted run would have. `eval_sets` maps a split name to fixed batches.
    """
    tc = trainer.tc
    wall_start = time.perf_counter()
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.ckpt_keep)
    start = ckpt.latest_step()
    if start is None:
        start, state = 0, trainer.init_state()
    else:
        check_compatible(ckpt.restore_meta(start), meta, resumable_keys(trainer.cfg), directory=ckpt.directory,
                         defaults=config_defaults(trainer.cfg))
        state, _ = ckpt.restore(trainer.abstract_state(), start)
        console(f"resuming from the checkpoint at step {start} in {workdir}")
    writer = MetricsWriter(workdir)
    batch = trainer.put_batch(batch_fn(start))
    compile_s = trainer.compile(state, batch)
    console(f"compiled the train step in {compile_s:.1f}s")

    def evaluate(step: int) -> dict[str, float]:
        losses = {f"{split}_loss": trainer.eval_loss(state["params"], batches) for split, batches in eval_sets.items()}
        writer.write(step, losses)
        console(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        return losses

    train_time, trained_steps, window_time, window_steps = 0.0, 0, 0.0, 0
    last: dict[str, float] = {}
    try:
        with StopRequest() as stop:
            for step in range(start, tc.max_iters):
                t0 = time.perf_counter()
                state, metrics = trainer.step(state, batch)
                if step + 1 < tc.max_iters:
                    batch = trainer.put_batch(batch_fn(step + 1))  # built on the host while the step runs
                # Waiting for every step also keeps XLA's CPU collectives from deadlocking with several devices.
                loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
                dt = time.perf_counter() - t0
                # A finite loss with NaN gradients would still poison the parameters saved next.
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    raise TrainingDiverged(
                        f"loss became {loss} (gradient norm {grad_norm}) at step {step}: lower --learning_rate or "
                        f"raise --warmup_iters; the last good checkpoint in {workdir} is kept"
                    )
                train_time, trained_steps = train_time + dt, trained_steps + 1
                window_time, window_steps = window_time + dt, window_steps + 1
                done = step + 1
                if done % tc.log_interval == 0 or done == tc.max_iters:
                    tokens_per_sec = window_steps * tc.batch_size * _seq_len(batch) / window_time
                    extra = {k: float(v) for k, v in metrics.items() if k not in ("loss", "grad_norm") and v.ndim == 0}
                    record = {**extra, "loss": loss, "grad_norm": grad_norm,
                              "lr": float(learning_rate(step, tc)), "ms_per_iter": 1e3 * window_time / window_steps,
                              "tokens_per_sec": tokens_per_sec}
                    if flops_per_step and peak_flops:
                        record["mfu"] = flops_per_step * window_steps / window_time / peak_flops
                    writer.write(done, record)
                    mfu = f", mfu {100 * record['mfu']:.1f}%" if "mfu" in record else ""
                    console(f"iter {done}: loss {loss:.4f}, {record['ms_per_iter']:.1f} ms/iter, "
                            f"{tokens_per_sec:,.0f} tok/s{mfu}")
                    window_time, window_steps = 0.0, 0
                if done % tc.eval_interval == 0 or done == tc.max_iters:
                    last = evaluate(done)
                stopping = distributed.any_process(stop.signal is not None)  # every process stops at the same step
                if done % tc.ckpt_interval == 0 or done == tc.max_iters or stopping:
                    ckpt.save(done, state, meta)
                if stopping:
                    console(f"stopped by signal {stop.signal} at step {done}; checkpoint saved, rerun to resume")
                    break
        if not last:
            last = evaluate(int(state["step"]))
    finally:  # also on divergence or any error: finish pending saves, flush metrics
        ckpt.close()
        writer.close()
    seq_tokens = tc.batch_size * _seq_len(batch)
    tokens_per_sec = trained_steps * seq_tokens / train_time if train_time else 0.0
    summary = {
        **last, "iters": int(state["step"]), "tokens_per_sec": tokens_per_sec,
        "ms_per_iter": 1e3 * train_time / max(trained_steps, 1), "compile_time_s": compile_s,
        "wall_time_s": time.perf_counter() - wall_start, "interrupted": stop.signal is not None,
    }
    if flops_per_step and peak_flops and train_time:
        summary["mfu"] = flops_per_step * trained_steps / train_time / peak_flops
    return state, summary


def _seq_len(batch: Batch) -> int:
    return jax.tree.leaves(batch)[0].shape[-1]
