"""Pallas kernels: speed on a GPU, accuracy everywhere, and a static H100 roofline.

    python benchmarks/kernels.py

Prints one `name value unit` line per figure:

* always: the roofline of each benchmark shape (FLOPs, HBM bytes, arithmetic
  intensity, ideal time and the bound on an H100 SXM: 989 dense bf16 TFLOP/s,
  1979 dense fp8 TFLOP/s, 3.35 TB/s), and the kernels' error figures
  (`flash_fwd_rel_err_f32`, `flash_bwd_rel_err_f32`, bf16 errors next to
  XLA's bf16 attention, `fp8_rel_err_vs_dequant`, `fp8_rel_err_vs_exact`, and
  per-tensor vs 1x128/128x128 block scaling on Gaussian and outlier-channel
  inputs). Off-GPU the kernels run in the Pallas interpreter on small shapes.
* on a GPU only: TFLOP/s of flash attention (fwd and fwd+bwd) against XLA
  attention and cuDNN (`jax.nn.dot_product_attention`), and of the fp8 GEMM
  against a bf16 `jnp.dot`.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Runnable as a plain script.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels_pallas.flash_attention import flash_attention, reference_attention  # noqa: E402
from kernels_pallas.fp8_matmul import fp8_dot, reference_fp8_dot  # noqa: E402

H100_BF16_FLOPS = 989e12
H100_FP8_FLOPS = 1979e12
H100_HBM_BYTES_PER_S = 3.35e12

# (name, B, T, H, K, D, causal, window) — the shapes the H100 targets refer to.
ATTENTION_SHAPES = [
    ("flash_T4096_H16_D128_causal", 4, 4096, 16, 16, 128, True, None),
    ("flash_T8192_H16_D128_causal", 2, 8192, 16, 16, 128, True, None),
    ("flash_T4096_H32_K8_D128_causal_gqa", 4, 4096, 32, 8, 128, True, None),
    ("flash_T8192_H16_D128_window4096", 2, 8192, 16, 16, 128, True, 4096),
]
GEMM_SHAPES = [("fp8_gemm_4096x7168x16384", 4096, 7168, 16384), ("fp8_gemm_4096x7168x2048", 4096, 7168, 2048)]


def emit(name: str, value: float, unit: str) -> None:
    print(f"{name} {value:.6g} {unit}", flush=True)


def rel_l2(x: jax.Array, ref: jax.Array) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


# --------------------------------------------------------------------------- #
# Static roofline
# --------------------------------------------------------------------------- #


def attention_cost(B: int, T: int, H: int, K: int, D: int, causal: bool, window: int | None):
    """(fwd FLOPs, fwd bytes, bwd FLOPs, bwd bytes) for bf16 attention.

    FLOPs count only the visible part of the score matrix (what a kernel that
    skips masked blocks must do; the usual FA convention). The forward has two
    GEMMs per score, the backward five (QK^T recomputed, dV, dP, dQ, dK).
    Bytes assume each tensor crosses HBM once (perfect K/V reuse in L2).
    """
    if window is not None:
        visible = T * window - window * (window - 1) / 2
    elif causal:
        visible = T * (T + 1) / 2
    else:
        visible = T * T
    fwd_flops = 4 * B * H * visible * D
    q_bytes, kv_bytes, lse_bytes = 2 * B * T * H * D, 2 * B * T * K * D, 4 * B * H * T
    fwd_bytes = 2 * q_bytes + 2 * kv_bytes + lse_bytes  # read Q, K, V; write O, LSE
    bwd_bytes = 4 * q_bytes + 4 * kv_bytes + 2 * lse_bytes  # Q,O,dO,dQ; K,V,dK,dV; LSE,delta
    return fwd_flops, fwd_bytes, 2.5 * fwd_flops, bwd_bytes


def gemm_cost(M: int, K: int, N: int):
    """(FLOPs, bytes) of an fp8 GEMM with bf16 output and fp32 1x128/128x128 scales."""
    flops = 2 * M * K * N
    scale_bytes = 4 * (M * K / 128 + K * N / 128**2)
    return flops, M * K + K * N + 2 * M * N + scale_bytes


def roofline(name: str, flops: float, hbm_bytes: float, peak_flops: float) -> None:
    intensity = flops / hbm_bytes
    ridge = peak_flops / H100_HBM_BYTES_PER_S
    ideal_s = max(flops / peak_flops, hbm_bytes / H100_HBM_BYTES_PER_S)
    emit(f"{name}_flops", flops, "FLOP")
    emit(f"{name}_hbm_bytes", hbm_bytes, "B")
    emit(f"{name}_intensity", intensity, "FLOP/B")
    emit(f"{name}_h100_ideal_time", ideal_s * 1e3, "ms")
    emit(f"{name}_h100_compute_bound", float(intensity > ridge), "bool")


def print_roofline() -> None:
    for name, B, T, H, K, D, causal, window in ATTENTION_SHAPES:
        fwd_f, fwd_b, bwd_f, bwd_b = attention_cost(B, T, H, K, D, causal, window)
        roofline(f"roofline_{name}_fwd", fwd_f, fwd_b, H100_BF16_FLOPS)
        roofline(f"roofline_{name}_bwd", bwd_f, bwd_b, H100_BF16_FLOPS)
    for name, M, K, N in GEMM_SHAPES:
        roofline(f"roofline_{name}", *gemm_cost(M, K, N), H100_FP8_FLOPS)


# --------------------------------------------------------------------------- #
# Accuracy (interpret mode off-GPU)
# --------------------------------------------------------------------------- #


def _attention_outputs(fn: Callable, q, k, v, do):
    def run(q, k, v, do):
        o, vjp = jax.vjp(fn, q, k, v)
        return (o, *vjp(do))

    return jax.jit(run)(q, k, v, do)


def attention_errors() -> None:
    B, T, H, K, D = 1, 200, 8, 2, 128
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, do = (jax.random.normal(keys[i], (B, T, H, D)) for i in (0, 3))
    k, v = (jax.random.normal(keys[i], (B, T, K, D)) for i in (1, 2))
    for tag, kw in (("", dict(causal=True)), ("_window", dict(causal=True, sliding_window=64))):
        flash = functools.partial(flash_attention, **kw, block_q=64, block_k=32)
        ref = functools.partial(reference_attention, **kw)
        truth = _attention_outputs(ref, q, k, v, do)
        got = _attention_outputs(flash, q, k, v, do)
        emit(f"flash{tag}_fwd_rel_err_f32", rel_l2(got[0], truth[0]), "rel_l2")
        emit(f"flash{tag}_bwd_rel_err_f32", max(map(rel_l2, got[1:], truth[1:])), "rel_l2")
        if tag:
            continue
        bf = [x.astype(jnp.bfloat16) for x in (q, k, v, do)]
        got = _attention_outputs(flash, *bf)
        xla = _attention_outputs(functools.partial(reference_attention, **kw, dtype=jnp.bfloat16), *bf)
        fwd_f, fwd_x = rel_l2(got[0], truth[0]), rel_l2(xla[0], truth[0])
        bwd_f = max(map(rel_l2, got[1:], truth[1:]))
        bwd_x = max(map(rel_l2, xla[1:], truth[1:]))
        emit("flash_fwd_rel_err_bf16", fwd_f, "rel_l2")
        emit("xla_attention_fwd_rel_err_bf16", fwd_x, "rel_l2")
        emit("flash_bwd_rel_err_bf16", bwd_f, "rel_l2")
        emit("xla_attention_bwd_rel_err_bf16", bwd_x, "rel_l2")
        emit("flash_vs_xla_bf16_err_ratio_fwd", fwd_f / fwd_x, "x")
        emit("flash_vs_xla_bf16_err_ratio_bwd", bwd_f / bwd_x, "x")


def per_tensor_fp8(x: jax.Array) -> jax.Array:
    """Dequantized x after a single-scale (per-tensor) e4m3 cast, for contrast."""
    scale = jnp.max(jnp.abs(x)) / float(jnp.finfo(jnp.float8_e4m3fn).max)
    return (x / scale).astype(jnp.float8_e4m3fn).astype(jnp.float32) * scale


def fp8_errors() -> None:
    M, K, N = 256, 1024, 384
    kx, kw, kd = jax.random.split(jax.random.PRNGKey(1), 3)
    w = jax.random.normal(kw, (K, N)) / np.sqrt(K)
    gaussian = jax.random.normal(kx, (M, K))
    outlier = gaussian.at[:, :: K // 8].mul(100.0)  # 8 hot channels, as in LLM activations.
    dot = jax.jit(lambda x, w: fp8_dot(x, w, out_dtype=jnp.float32))
    for tag, x in (("", gaussian), ("_outlier", outlier)):
        exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
        y = dot(x, w)
        emit(f"fp8_rel_err_vs_dequant{tag}", rel_l2(y, reference_fp8_dot(x, w)), "rel_l2")
        emit(f"fp8_rel_err_vs_exact{tag}", rel_l2(y, exact), "rel_l2")
        emit(f"fp8_per_tensor_rel_err_vs_exact{tag}", rel_l2(per_tensor_fp8(x) @ per_tensor_fp8(w), exact), "rel_l2")
    dy = jax.random.normal(kd, (M, N))
    exact = (np.asarray(dy @ w.T, np.float64), np.asarray(gaussian.T @ dy, np.float64))
    for grad_dtype in ("e4m3", "e5m2"):
        fn = functools.partial(fp8_dot, grad_dtype=grad_dtype)
        grads = jax.jit(lambda x, w, dy, fn=fn: jax.vjp(fn, x, w)[1](dy))(gaussian, w, dy)
        emit(f"fp8_{grad_dtype}_grad_dx_rel_err_vs_exact", rel_l2(grads[0], exact[0]), "rel_l2")
        emit(f"fp8_{grad_dtype}_grad_dw_rel_err_vs_exact", rel_l2(grads[1], exact[1]), "rel_l2")


# --------------------------------------------------------------------------- #
# Speed (GPU only)
# --------------------------------------------------------------------------- #


def seconds_per_call(fn: Callable, *args, reps: int = 20) -> float:
    """Median wall time of a jitted call, after compilation and one warm-up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def attention_impls(causal: bool, window: int | None) -> dict[str, Callable]:
    """The Pallas kernel and the two attentions it has to beat."""
    local = None if window is None else (window - 1, 0)
    return {
        "pallas": functools.partial(flash_attention, causal=causal, sliding_window=window),
        "xla": functools.partial(jax.nn.dot_product_attention, is_causal=causal, local_window_size=local),
        "cudnn": functools.partial(
            jax.nn.dot_product_attention, is_causal=causal, local_window_size=local, implementation="cudnn"
        ),
    }


def sum_loss(fn: Callable, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return jnp.sum(fn(q, k, v).astype(jnp.float32))


def attention_speed() -> None:
    for name, B, T, H, K, D, causal, window in ATTENTION_SHAPES:
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        q = jax.random.normal(keys[0], (B, T, H, D), jnp.bfloat16)
        k, v = (jax.random.normal(keys[i], (B, T, K, D), jnp.bfloat16) for i in (1, 2))
        fwd_flops, _, bwd_flops, _ = attention_cost(B, T, H, K, D, causal, window)
        for impl, fn in attention_impls(causal, window).items():
            try:
                fwd = seconds_per_call(jax.jit(fn), q, k, v)
                grad = jax.grad(functools.partial(sum_loss, fn), argnums=(0, 1, 2))
                fwd_bwd = seconds_per_call(jax.jit(grad), q, k, v)
            except Exception as e:  # cuDNN may reject a shape/GPU; report and go on.
                print(f"# {name} {impl} skipped: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            emit(f"{name}_{impl}_fwd", fwd_flops / fwd / 1e12, "TFLOP/s")
            emit(f"{name}_{impl}_fwd_bwd", (fwd_flops + bwd_flops) / fwd_bwd / 1e12, "TFLOP/s")


def gemm_speed() -> None:
    for name, M, K, N in GEMM_SHAPES:
        x = jax.random.normal(jax.random.PRNGKey(0), (M, K), jnp.bfloat16)
        w = jax.random.normal(jax.random.PRNGKey(1), (K, N), jnp.bfloat16)
        flops = 2 * M * K * N
        emit(f"{name}_pallas_fp8", flops / seconds_per_call(jax.jit(fp8_dot), x, w) / 1e12, "TFLOP/s")
        emit(f"{name}_xla_bf16", flops / seconds_per_call(jax.jit(jnp.dot), x, w) / 1e12, "TFLOP/s")


def main() -> None:
    on_gpu = jax.default_backend() == "gpu"
    emit("kernels_on_gpu", float(on_gpu), "bool")
    print_roofline()
    attention_errors()
    fp8_errors()
    if on_gpu:
        attention_speed()
        gemm_speed()


if __name__ == "__main__":
    main()
