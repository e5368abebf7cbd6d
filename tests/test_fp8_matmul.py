"""FP8 block-scaled GEMM vs. "dequantize then compute in f64", in interpret mode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.fp8_matmul import (
    dequantize_blockwise,
    dequantize_rowwise,
    fp8_dot,
    quantize_blockwise,
    quantize_rowwise,
    reference_fp8_dot,
)

# Interpret-mode kernels are big XLA while loops; -O0 compiles them ~3x faster.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _run(fn, *args):
    """Runs ``fn`` jit-compiled: one compile instead of one per eager op."""
    return jax.jit(fn).lower(*args).compile(_FAST_COMPILE)(*args)


def _rel_l2(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _dq_rows(x, dtype=jnp.float8_e4m3fn) -> np.ndarray:
    """fp64 copy of x after 1x128-tile fp8 quantization (along the last dim)."""
    return np.asarray(dequantize_rowwise(*quantize_rowwise(x, dtype)), np.float64)


def _dq_blocks(w) -> np.ndarray:
    return np.asarray(dequantize_blockwise(*quantize_blockwise(w)), np.float64)


def _operands(M, K, N, dtype=jnp.float32, seed=0):
    kx, kw, kd = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, (M, K), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (K, N), jnp.float32) / np.sqrt(K)).astype(dtype)
    dy = jax.random.normal(kd, (M, N), jnp.float32).astype(dtype)
    return x, w, dy


def test_quantize_roundtrip_and_layout():
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 300)).at[:, 130].mul(1000.0)
    x = x.at[:, 256:].set(0.0)  # An all-zero tile must not produce NaN scales.
    x_q, s = quantize_rowwise(x)
    assert x_q.dtype == jnp.float8_e4m3fn and x_q.shape == x.shape and s.shape == (8, 3)
    assert np.isfinite(np.asarray(s)).all()
    # e4m3 keeps 3 mantissa bits: elementwise error <= 2^-4 relative, per tile.
    assert _rel_l2(dequantize_rowwise(x_q, s)[:, :128], x[:, :128]) < 0.04
    w_q, sw = quantize_blockwise(x.T)
    assert w_q.shape == (300, 8) and sw.shape == (3, 1)
    assert _rel_l2(dequantize_blockwise(w_q, sw), x.T) < 0.04


@pytest.mark.parametrize(
    "shape",
    [(64, 128, 384), (4, 200, 65), (130, 256, 128)],
    ids=["K128_N384", "ragged_N65", "M130"],
)
def test_matches_dequantized_reference(shape):
    M, K, N = shape
    x, w, _ = _operands(M, K, N)
    y = _run(lambda x, w: fp8_dot(x, w, out_dtype=jnp.float32, block_m=64), x, w)
    want = _dq_rows(x) @ _dq_blocks(w)
    assert y.shape == (M, N) and y.dtype == jnp.float32
    assert _rel_l2(y, want) <= 5e-3
    assert _rel_l2(y, reference_fp8_dot(x, w)) <= 5e-3
    # And the format error itself is what e4m3 should give on Gaussian data.
    assert _rel_l2(y, np.asarray(x, np.float64) @ np.asarray(w, np.float64)) < 0.06


def test_leading_batch_dims_and_bf16_output():
    x, w, _ = _operands(2 * 3 * 16, 256, 96, dtype=jnp.bfloat16)
    x = x.reshape(2, 3, 16, 256)
    y = _run(fp8_dot, x, w)
    assert y.shape == (2, 3, 16, 96) and y.dtype == jnp.bfloat16
    want = _dq_rows(x.reshape(-1, 256)) @ _dq_blocks(w)
    assert _rel_l2(y.reshape(-1, 96), want) <= 5e-3


def test_block_scaling_beats_per_tensor_on_outlier_channels():
    x, w, _ = _operands(64, 512, 128)
    x = x.at[:, ::97].mul(200.0)  # A few outlier channels, as in LLM activations.
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    block_err = _rel_l2(_run(lambda x, w: fp8_dot(x, w, out_dtype=jnp.float32), x, w), exact)
    amax = float(jnp.max(jnp.abs(x)))
    x_tensor = (x / (amax / 448.0)).astype(jnp.float8_e4m3fn).astype(jnp.float32) * (amax / 448.0)
    tensor_err = _rel_l2(np.asarray(x_tensor, np.float64) @ _dq_blocks(w), exact)
    assert block_err < 0.06 and block_err < tensor_err


@pytest.mark.parametrize("grad_dtype", ["e4m3", "e5m2"])
def test_gradients_run_in_fp8(grad_dtype):
    """The backward equals the same fp8 recipe computed in f64, and is close
    (at fp8 precision) to the exact f32 gradients."""
    M, K, N = 96, 256, 192
    x, w, dy = _operands(M, K, N, seed=1)

    def grads(x, w, dy):
        _, vjp = jax.vjp(lambda x, w: fp8_dot(x, w, grad_dtype=grad_dtype, block_m=64, block_n=64), x, w)
        return vjp(dy)

    dx, dw = _run(grads, x, w, dy)
    assert dx.shape == x.shape and dw.shape == w.shape

    g = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}[grad_dtype]
    # dX = dY W^T with dY tiled along N; dW = X^T dY with both tiled along M.
    dx_recipe = _dq_rows(dy, g) @ _dq_blocks(w).T
    dw_recipe = _dq_rows(x.T) @ _dq_rows(dy.T, g).T
    assert _rel_l2(dx, dx_recipe) <= 5e-3
    assert _rel_l2(dw, dw_recipe) <= 5e-3

    dx_exact, dw_exact = np.asarray(dy @ w.T), np.asarray(x.T @ dy)
    tol = 0.06 if grad_dtype == "e4m3" else 0.1  # e5m2 has one mantissa bit fewer.
    assert _rel_l2(dx, dx_exact) < tol
    assert _rel_l2(dw, dw_exact) < tol


def test_linear_layer_trains_in_fp8():
    """A least-squares fit through fp8_dot converges like the f32 one."""
    x, w_true, _ = _operands(512, 128, 128, seed=2)
    y = x @ w_true

    def loss(w):
        return jnp.mean(jnp.sum((fp8_dot(x, w) - y) ** 2, axis=-1))

    def step(w):
        value, grad = jax.value_and_grad(loss)(w)
        return w - 0.2 * grad, value

    w = jnp.zeros_like(w_true)
    step = jax.jit(step).lower(w).compile(_FAST_COMPILE)
    losses = []
    for _ in range(30):
        w, value = step(w)
        losses.append(float(value))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.01 * losses[0], losses


def test_rejects_bad_arguments():
    x, w, _ = _operands(16, 128, 128)
    with pytest.raises(ValueError, match="grad_dtype"):
        fp8_dot(x, w, grad_dtype="e3m4")
    with pytest.raises(ValueError, match="contract"):
        fp8_dot(x, w[:64])
