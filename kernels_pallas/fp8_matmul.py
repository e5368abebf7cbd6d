"""FP8 GEMM with DeepSeek-V3 fine-grained scaling, in Pallas (Triton backend).

Why fine-grained scales: a single per-tensor scale lets one outlier channel
push every other value into e4m3's coarse subnormal range. DeepSeek-V3 instead
scales activations per 1x128 tile (one row, one 128-wide chunk of the
contraction dim) and weights per 128x128 block, so an outlier only costs
precision inside its own tile. Because every scale is constant along a
128-wide chunk of the contraction dim, the kernel can run the MMA on raw fp8
tiles and apply ``scale_a[row] * scale_b[col]`` to each 128-deep partial
product in fp32, which keeps the inner loop on fp8 tensor cores.

The kernel is written once for the general case "lhs scaled per (row,
K-chunk), rhs scaled per (K-chunk, column)"; 128x128 weight blocks are that
case with each block's scale repeated over its 128 columns. This lets the
backward GEMMs reuse it unchanged:

* dX = dY W^T: dY quantized per 1x128 tile along N, the forward's quantized
  weights transposed;
* dW = X^T dY: both quantized per 128-long tile along M (the tokens), the
  contraction dim of this GEMM.

Gradients are quantized to e4m3 (DeepSeek-V3) or e5m2 (wider range, the
"hybrid" recipe). Pallas' Triton lowering requires both MMA operands to have
the same element type, so a mixed e4m3 x e5m2 product is upcast to bf16 in
registers (exact: both formats embed in bf16); memory traffic stays fp8.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import _compat

TILE = 128  # Scaling granularity along every dimension (DeepSeek-V3).
_GROUP_M = 8  # Row-blocks per launch group, for L2 reuse of the rhs.
FP8_DTYPES = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static launch parameters of one fp8_dot, hashable for custom_vjp."""

    grad_dtype: jnp.dtype
    out_dtype: jnp.dtype
    w_dtype: jnp.dtype  # dtype of the returned weight gradient.
    block_m: int
    block_n: int
    num_warps: int | None
    num_stages: int | None
    interpret: bool


# --------------------------------------------------------------------------- #
# Quantization helpers
# --------------------------------------------------------------------------- #


def _fp8_max(dtype: jnp.dtype) -> float:
    return float(jnp.finfo(dtype).max)


def _quantize_tiles(x_RC: jax.Array, tile: tuple[int, int], dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """Scales each ``tile`` of a (tile-divisible) matrix onto the fp8 range.

    Returns fp8 values and fp32 scales of shape ``x.shape // tile`` such that
    ``x ~= x_q * scale`` tile by tile. All-zero tiles get scale 1 (not 0) so
    padding never divides by zero.
    """
    R, C = x_RC.shape
    tr, tc = tile
    x = x_RC.astype(jnp.float32).reshape(R // tr, tr, C // tc, tc)
    amax = jnp.max(jnp.abs(x), axis=(1, 3))
    fmax = _fp8_max(dtype)
    scale = jnp.where(amax > 0, amax / fmax, 1.0)
    x_q = jnp.clip(x / scale[:, None, :, None], -fmax, fmax).astype(dtype)
    return x_q.reshape(R, C), scale


def _dequantize_tiles(x_q_RC: jax.Array, scale: jax.Array, tile: tuple[int, int]) -> jax.Array:
    s = jnp.repeat(jnp.repeat(scale, tile[0], axis=0), tile[1], axis=1)
    return x_q_RC.astype(jnp.float32) * s


def _pad2(x: jax.Array, rows: int, cols: int) -> jax.Array:
    R, C = x.shape
    if (R, C) == (rows, cols):
        return x
    return jnp.pad(x, ((0, rows - R), (0, cols - C)))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def quantize_rowwise(x_MK: jax.Array, dtype: jnp.dtype = jnp.float8_e4m3fn) -> tuple[jax.Array, jax.Array]:
    """Activation quantization: one fp32 scale per 1x128 tile.

    Returns ``(x_q_MK, scale_MKt)`` with ``scale_MKt`` of shape [M, ceil(K/128)].
    """
    M, K = x_MK.shape
    x_q, scale = _quantize_tiles(_pad2(x_MK, M, _round_up(K, TILE)), (1, TILE), dtype)
    return x_q[:, :K], scale


def quantize_blockwise(w_KN: jax.Array, dtype: jnp.dtype = jnp.float8_e4m3fn) -> tuple[jax.Array, jax.Array]:
    """Weight quantization: one fp32 scale per 128x128 block.

    Returns ``(w_q_KN, scale_KtNt)`` with scales of shape [ceil(K/128), ceil(N/128)].
    """
    K, N = w_KN.shape
    w = _pad2(w_KN, _round_up(K, TILE), _round_up(N, TILE))
    w_q, scale = _quantize_tiles(w, (TILE, TILE), dtype)
    return w_q[:K, :N], scale


def dequantize_rowwise(x_q_MK: jax.Array, scale_MKt: jax.Array) -> jax.Array:
    """Inverse of :func:`quantize_rowwise`, in fp32."""
    M, K = x_q_MK.shape
    x_q = _pad2(x_q_MK, M, scale_MKt.shape[1] * TILE)
    return _dequantize_tiles(x_q, scale_MKt, (1, TILE))[:, :K]


def dequantize_blockwise(w_q_KN: jax.Array, scale_KtNt: jax.Array) -> jax.Array:
    """Inverse of :func:`quantize_blockwise`, in fp32."""
    K, N = w_q_KN.shape
    Kt, Nt = scale_KtNt.shape
    w_q = _pad2(w_q_KN, Kt * TILE, Nt * TILE)
    return _dequantize_tiles(w_q, scale_KtNt, (TILE, TILE))[:K, :N]


def reference_fp8_dot(x_MK: jax.Array, w_KN: jax.Array, *, out_dtype: jnp.dtype | None = None) -> jax.Array:
    """What :func:`fp8_dot` computes, as "quantize, dequantize, matmul in fp32".

    The gap between this and ``fp8_dot`` isolates the kernel's own error
    (fp32 accumulation order); the gap between this and ``x @ w`` is the
    quantization error of the format itself.
    """
    lead, K = x_MK.shape[:-1], x_MK.shape[-1]
    x = x_MK.reshape(-1, K)
    x_dq = dequantize_rowwise(*quantize_rowwise(x))
    w_dq = dequantize_blockwise(*quantize_blockwise(w_KN))
    y = jnp.dot(x_dq, w_dq, precision=lax.Precision.HIGHEST)
    return y.reshape(*lead, w_KN.shape[1]).astype(out_dtype or jnp.float32)


# --------------------------------------------------------------------------- #
# Kernel
# --------------------------------------------------------------------------- #


def _scaled_mm_kernel(a_ref, sa_ref, b_ref, sb_ref, o_ref):
    """One (block_m, block_n) output tile; K walked in 128-deep scaled steps."""
    n_k = a_ref.shape[1] // TILE

    def body(kt, acc):
        a = a_ref[:, pl.ds(kt * TILE, TILE)]
        b = b_ref[pl.ds(kt * TILE, TILE), :]
        if a.dtype != b.dtype:  # e4m3 x e5m2: see module docstring.
            a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
        part = jnp.dot(a, b, preferred_element_type=jnp.float32)
        return acc + part * sa_ref[kt, :][:, None] * sb_ref[kt, :][None, :]

    acc = jnp.zeros(o_ref.shape, jnp.float32)
    o_ref[...] = lax.fori_loop(0, n_k, body, acc).astype(o_ref.dtype)


def _tile_of(pid: jax.Array, m_blocks: int, n_blocks: int) -> tuple[jax.Array, jax.Array]:
    """Grouped launch order: ``_GROUP_M`` row-blocks sweep the columns together,
    so consecutive programs share rhs tiles in L2."""
    per_group = _GROUP_M * n_blocks
    first_m = lax.div(pid, per_group) * _GROUP_M
    group_m = jnp.minimum(m_blocks - first_m, _GROUP_M)
    in_group = lax.rem(pid, per_group)
    return first_m + lax.rem(in_group, group_m), lax.div(in_group, group_m)


def _scaled_mm(
    a_MK: jax.Array,
    sa_KtM: jax.Array,
    b_KN: jax.Array,
    sb_KtN: jax.Array,
    cfg: _Config,
    out_dtype: jnp.dtype,
) -> jax.Array:
    """``sum_kt (a[:, kt] @ b[kt, :]) * sa[kt, :, None] * sb[kt, None, :]``.

    Shapes must be multiples of the blocks (callers pad). Scales are stored
    K-tile-major so each step loads one contiguous row of them.
    """
    M, K = a_MK.shape
    N = b_KN.shape[1]
    bm, bn = cfg.block_m, cfg.block_n
    m_blocks, n_blocks = M // bm, N // bn

    def tile(pid):
        return _tile_of(pid, m_blocks, n_blocks)

    return pl.pallas_call(
        _scaled_mm_kernel,
        grid=(m_blocks * n_blocks,),
        in_specs=[
            pl.BlockSpec((bm, K), lambda p: (tile(p)[0], 0)),
            pl.BlockSpec((K // TILE, bm), lambda p: (0, tile(p)[0])),
            pl.BlockSpec((K, bn), lambda p: (0, tile(p)[1])),
            pl.BlockSpec((K // TILE, bn), lambda p: (0, tile(p)[1])),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda p: tile(p)),
        out_shape=jax.ShapeDtypeStruct((M, N), out_dtype),
        compiler_params=_compat.triton_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="fp8_scaled_matmul",
    )(a_MK, sa_KtM, b_KN, sb_KtN)


# --------------------------------------------------------------------------- #
# Public op with FP8 backward
# --------------------------------------------------------------------------- #


# jit with static options: eager calls then hit the compilation cache instead of
# re-lowering the kernel each time; under an outer jit it is simply inlined.
@functools.partial(
    jax.jit,
    static_argnames=("grad_dtype", "out_dtype", "block_m", "block_n", "num_warps", "num_stages", "interpret"),
)
def fp8_dot(
    x_MK: jax.Array,
    w_KN: jax.Array,
    *,
    grad_dtype: Literal["e4m3", "e5m2"] = "e4m3",
    out_dtype: jnp.dtype | None = None,
    block_m: int = 128,
    block_n: int = 128,
    num_warps: int | None = 8,
    num_stages: int | None = 3,
    interpret: bool | None = None,
) -> jax.Array:
    """``x @ w`` with both operands in fp8 e4m3 and fine-grained fp32 scales.

    Args:
      x_MK: activations [..., K]; leading dims are flattened into M.
      w_KN: weights [K, N].
      grad_dtype: fp8 format for the output gradient in the backward GEMMs.
      out_dtype: result dtype (default: promoted input dtype).
      block_m, block_n: output tile (powers of two, <= 128 or multiples of it).
      num_warps, num_stages: Triton launch parameters.
      interpret: Pallas interpreter; None means "unless on a GPU".

    Any M, K, N works: everything is zero-padded to tile multiples internally
    (zero tiles quantize exactly) and cropped afterwards. Differentiable; the
    backward runs dX and dW through the same fp8 kernel.
    """
    if grad_dtype not in FP8_DTYPES:
        raise ValueError(f"grad_dtype must be one of {sorted(FP8_DTYPES)}, got {grad_dtype!r}")
    if w_KN.ndim != 2 or x_MK.shape[-1] != w_KN.shape[0]:
        raise ValueError(f"cannot contract x {x_MK.shape} with w {w_KN.shape}")
    for b in (block_m, block_n):
        if b < 16 or b & (b - 1):
            raise ValueError(f"block sizes must be powers of two >= 16, got {b}")
    cfg = _Config(
        grad_dtype=jnp.dtype(FP8_DTYPES[grad_dtype]),
        out_dtype=jnp.dtype(out_dtype or jnp.result_type(x_MK.dtype, w_KN.dtype)),
        w_dtype=jnp.dtype(w_KN.dtype),
        block_m=block_m,
        block_n=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=_compat.resolve_interpret(interpret),
    )
    lead, K = x_MK.shape[:-1], x_MK.shape[-1]
    y_MN = _fp8_dot(x_MK.reshape(-1, K), w_KN, cfg)
    return y_MN.reshape(*lead, w_KN.shape[1])


def _padded_shape(M: int, K: int, N: int, cfg: _Config) -> tuple[int, int, int]:
    """Every dim is a contraction dim in some GEMM of fwd/bwd, so all pad to
    the scale tile as well as to the output blocks."""
    return (
        _round_up(M, max(TILE, cfg.block_m, cfg.block_n)),
        _round_up(K, max(TILE, cfg.block_m, cfg.block_n)),
        _round_up(N, max(TILE, cfg.block_m, cfg.block_n)),
    )


def _forward(x_MK: jax.Array, w_KN: jax.Array, cfg: _Config):
    (M, K), N = x_MK.shape, w_KN.shape[1]
    Mp, Kp, Np = _padded_shape(M, K, N, cfg)
    e4m3 = jnp.dtype(jnp.float8_e4m3fn)
    x_q, sx_MKt = _quantize_tiles(_pad2(x_MK, Mp, Kp), (1, TILE), e4m3)
    w_q, sw_KtNt = _quantize_tiles(_pad2(w_KN, Kp, Np), (TILE, TILE), e4m3)
    y = _scaled_mm(x_q, sx_MKt.T, w_q, jnp.repeat(sw_KtNt, TILE, axis=1), cfg, cfg.out_dtype)
    return y[:M, :N], (w_q, sw_KtNt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_dot(x_MK: jax.Array, w_KN: jax.Array, cfg: _Config) -> jax.Array:
    return _forward(x_MK, w_KN, cfg)[0]


def _fp8_dot_fwd(x_MK: jax.Array, w_KN: jax.Array, cfg: _Config):
    y, (w_q, sw_KtNt) = _forward(x_MK, w_KN, cfg)
    # The fp8 weights are reused as-is for dX; x is kept in its own dtype
    # because dW needs it re-tiled along M, not along K.
    return y, (x_MK, w_q, sw_KtNt)


def _fp8_dot_bwd(cfg: _Config, residuals, dy_MN: jax.Array):
    x_MK, w_q, sw_KtNt = residuals
    (M, K), N = x_MK.shape, dy_MN.shape[1]
    Mp, Kp, Np = _padded_shape(M, K, N, cfg)
    e4m3 = jnp.dtype(jnp.float8_e4m3fn)
    dy = _pad2(dy_MN, Mp, Np)

    # dX = dY W^T, contracting N: dY per 1x128 tile along N.
    dy_q, sdy_MNt = _quantize_tiles(dy, (1, TILE), cfg.grad_dtype)
    sw_NtK = jnp.repeat(sw_KtNt.T, TILE, axis=1)
    dx = _scaled_mm(dy_q, sdy_MNt.T, w_q.T, sw_NtK, cfg, x_MK.dtype)

    # dW = X^T dY, contracting M: both operands per 128-long tile along M.
    xt_q, sxt_KMt = _quantize_tiles(_pad2(x_MK, Mp, Kp).T, (1, TILE), e4m3)
    dyt_q, sdyt_NMt = _quantize_tiles(dy.T, (1, TILE), cfg.grad_dtype)
    dw = _scaled_mm(xt_q, sxt_KMt.T, dyt_q.T, sdyt_NMt.T, cfg, cfg.w_dtype)
    return dx[:M, :K], dw[:K, :N]


_fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)
