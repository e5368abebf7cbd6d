"""FLOP accounting and model FLOPs utilisation (MFU), in the nanoGPT / PaLM convention.

Training FLOPs per token = 6·N + 12·L·T·D:
- 6·N: every matmul parameter is used once per token in a multiply-add (2 FLOPs) forward and twice backward (4).
  N counts the parameters that take part in a matmul: all of them except the learned position table, and except
  the input embedding when it is not tied to the output head (a lookup, not a matmul).
- 12·L·T·D: attention scores and the weighted sum of values (2·2·T·D per layer forward, ×3 with backward), counted
  over the full T×T square as PaLM does (the causal half is not subtracted).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from llmjax import model
from llmjax.config import ModelConfig

# Dense bf16 peak, FLOP/s, of accelerators we know by `device_kind`.
GPU_PEAK_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12}


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters in the matmuls one token runs through (a mixture of experts counts only its top-k experts)."""
    shapes = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
    n = model.count_active_params(shapes, cfg)
    if cfg.position == "learned":
        n -= cfg.block_size * cfg.n_embd
    if not cfg.tie_embeddings:
        n -= cfg.vocab_size * cfg.n_embd
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    T = seq_len or cfg.block_size
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layer * T * cfg.n_embd


def measure_peak_flops(n: int = 1024, reps: int = 5, trials: int = 5) -> float:
    """The float32 matmul throughput one device reaches on this machine: MFU's denominator on CPUs, which have no
    published peak. On CPU one device already uses every core for a large matmul. The best of several trials is
    kept, so a moment of contention from other processes does not lower the peak (and inflate MFU past 100%)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(reps):
            out = f(a)
        out.block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best


def peak_flops() -> float:
    """Peak FLOP/s of the machine: the published figure for known GPUs, else a measured matmul rate."""
    device = jax.devices()[0]
    if device.platform == "gpu" and device.device_kind in GPU_PEAK_FLOPS:
        return GPU_PEAK_FLOPS[device.device_kind] * jax.device_count()
    return measure_peak_flops()
