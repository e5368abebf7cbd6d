"""Shared by the training benchmarks: time a Trainer's steps on random token batches, as the loop runs them."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from llmjax import train


def time_train_steps(trainer: train.Trainer, steps: int, warmup: int) -> tuple[Any, float, float]:
    """(final state, seconds per step, compile seconds) for `steps` timed steps after `warmup` untimed ones.

    A new host batch is built while each step runs, and every step's loss is waited for, as in `train.run_loop`
    (queued multi-device CPU steps can deadlock XLA's collectives).
    """
    cfg, tc = trainer.cfg, trainer.tc
    rng = np.random.default_rng(0)

    def batch() -> dict:
        x = rng.integers(0, cfg.vocab_size, (tc.batch_size, cfg.block_size + 1), dtype=np.int32)
        return trainer.put_batch({"x": x[:, :-1], "y": x[:, 1:]})

    state = trainer.init_state()
    next_batch = batch()
    compile_s = trainer.compile(state, next_batch)
    for _ in range(warmup):
        state, metrics = trainer.step(state, next_batch)
        float(metrics["loss"])
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = trainer.step(state, next_batch)
        next_batch = batch()
        float(metrics["loss"])
    return state, (time.perf_counter() - start) / steps, compile_s
