"""Metrics writers: `metrics.jsonl` (one JSON object per logged step), TensorBoard event files, the console."""

from __future__ import annotations

import json
import os
from typing import Any

import jax


class MetricsWriter:
    """Appends metrics from process 0 only, so a multi-host run writes one copy."""

    def __init__(self, workdir: str) -> None:
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in record.items():
            if name != "step":
                self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def console(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)
