"""FlashAttention-2 in Pallas (Triton backend), with a pure-jnp reference.

Why this shape of kernel:

* Online softmax in base 2: ``exp2`` is a single MUFU instruction on NVIDIA
  GPUs while ``exp`` is ``exp2`` plus a multiply, so ``log2(e)`` is folded into
  the softmax scale once and the log-sum-exp is kept in base 2 as well.
* fp32 running max / denominator / accumulator whatever the input dtype; the
  probabilities are cast back to the input dtype only as an MMA operand.
* The forward saves only the per-row log-sum-exp, so the backward recomputes
  P blockwise instead of storing the T x S matrix.
* The backward is split FA2-style: ``delta = rowsum(dO * O)`` (memory bound,
  left to XLA which fuses it), one kernel for dQ (parallel over query blocks)
  and one for dK/dV (parallel over key blocks). Neither needs atomics.
* Causal and sliding-window masks bound the KV loop (forward, dQ) and the Q
  loop (dK/dV), so blocks that are fully masked are never read. Each loop is
  split into masked edge blocks and an unmasked interior that skips the
  ``where``.
* Grouped-query / multi-query attention never repeats K/V: the forward and dQ
  kernels index the KV head as ``q_head // group`` in the BlockSpec, and the
  dK/dV kernel loops over the query heads of its group, accumulating in
  registers.

Layout is [batch, seq, heads, head_dim] throughout (suffixes: B batch, T query
length, S key length, H query heads, K key/value heads, D head dim, G query
heads per KV head).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import _compat

SUPPORTED_HEAD_DIMS: tuple[int, ...] = (64, 128)
_MIN_BLOCK = 16  # Smallest MMA tile Triton accepts on every dimension.
_LOG2E = math.log2(math.e)
_DOT_PRECISION = lax.Precision.HIGHEST  # IEEE fp32 for f32 inputs; no-op for 16-bit.


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static (hashable) parameters of one attention call, shared by all kernels."""

    causal: bool
    window: int | None  # Sliding window length, None for unbounded.
    scale: float  # Natural-base softmax scale.
    seq_q: int  # True (unpadded) query length.
    seq_k: int  # True (unpadded) key length.
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    num_warps: int | None
    num_stages: int | None
    interpret: bool

    @property
    def scale_log2(self) -> float:
        return self.scale * _LOG2E

    def for_backward(self) -> _Config:
        """The same call with the backward's tile sizes in ``block_q/block_k``."""
        return dataclasses.replace(self, block_q=self.block_q_bwd, block_k=self.block_k_bwd)


# jit with static options: eager calls then hit the compilation cache instead of
# re-lowering the kernels each time; under an outer jit it is simply inlined.
@functools.partial(
    jax.jit,
    static_argnames=(
        "causal",
        "sliding_window",
        "softmax_scale",
        "block_q",
        "block_k",
        "block_q_bwd",
        "block_k_bwd",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def flash_attention(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    softmax_scale: float | None = None,
    block_q: int = 128,
    block_k: int = 64,
    block_q_bwd: int = 64,
    block_k_bwd: int = 64,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Multi-head attention ``softmax(scale * Q K^T + mask) V`` with Pallas kernels.

    Args:
      q_BTHD: queries, bf16/fp16/fp32.
      k_BSKD, v_BSKD: keys and values; K must divide H (GQA/MQA when K < H).
      causal: query i attends keys j <= i (requires T == S).
      sliding_window: if set, query i attends only keys i - window < j <= i
        (Mistral-style; implies ``causal``).
      softmax_scale: defaults to 1/sqrt(D).
      block_q, block_k: forward tile sizes (powers of two >= 16); shrunk
        automatically for short sequences.
      block_q_bwd, block_k_bwd: the same for the dQ and dK/dV kernels, which
        hold more live tiles and so want smaller ones.
      num_warps: Triton warps per program (None: 4 for head dim 64, 8 for 128).
      num_stages: Triton software-pipelining depth (None: Pallas default, 3).
      interpret: run the kernels in the Pallas interpreter; None picks
        interpret mode whenever the default backend is not a GPU.

    Returns:
      o_BTHD in the dtype of ``q_BTHD``. Differentiable w.r.t. q, k and v.

    Head dims other than 64/128 are zero-padded to the next supported size
    (zeros change neither Q K^T nor the kept columns of the output); sequence
    lengths are padded to the block size and the padding is masked.
    """
    B, T, H, D = q_BTHD.shape
    _, S, K, _ = k_BSKD.shape
    _check_inputs(q_BTHD, k_BSKD, v_BSKD, causal=causal, sliding_window=sliding_window)
    D_pad = _padded_head_dim(D)
    block_q, block_q_bwd = _fit_block(block_q, T), _fit_block(block_q_bwd, T)
    block_k, block_k_bwd = _fit_block(block_k, S), _fit_block(block_k_bwd, S)
    cfg = _Config(
        causal=causal,
        window=sliding_window,
        scale=float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D),
        seq_q=T,
        seq_k=S,
        block_q=block_q,
        block_k=block_k,
        block_q_bwd=block_q_bwd,
        block_k_bwd=block_k_bwd,
        num_warps=num_warps if num_warps is not None else (4 if D_pad <= 64 else 8),
        num_stages=num_stages,
        interpret=_compat.resolve_interpret(interpret),
    )
    # Power-of-two blocks: the larger one is a multiple of the smaller.
    T_pad, S_pad = _round_up(T, max(block_q, block_q_bwd)), _round_up(S, max(block_k, block_k_bwd))
    q_pad = _pad_to(q_BTHD, T_pad, D_pad)
    k_pad = _pad_to(k_BSKD, S_pad, D_pad)
    v_pad = _pad_to(v_BSKD, S_pad, D_pad)
    o_pad = _flash_attention(q_pad, k_pad, v_pad, cfg)
    return o_pad[:, :T, :, :D]


def reference_attention(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    softmax_scale: float | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """Plain-XLA attention with the same semantics as :func:`flash_attention`.

    Everything (matmuls and softmax) is computed in ``dtype``: fp32 (or fp64)
    gives the ground truth the kernels are tested against, bf16 gives "what
    XLA's own bf16 attention would do", the baseline for bf16 tolerances.
    Returns the dtype of ``q_BTHD``.
    """
    B, T, H, D = q_BTHD.shape
    _, S, K, _ = k_BSKD.shape
    _check_inputs(q_BTHD, k_BSKD, v_BSKD, causal=causal, sliding_window=sliding_window)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    q = q_BTHD.astype(dtype).reshape(B, T, K, H // K, D)
    k, v = k_BSKD.astype(dtype), v_BSKD.astype(dtype)
    s_BKGTS = jnp.einsum(
        "btkgd,bskd->bkgts", q, k, precision=_DOT_PRECISION, preferred_element_type=dtype
    ) * jnp.asarray(scale, dtype)
    mask_TS = _mask(
        jnp.arange(T)[:, None],
        jnp.arange(S)[None, :],
        causal=causal,
        window=sliding_window,
        seq_k=S,
    )
    s_BKGTS = jnp.where(mask_TS, s_BKGTS, -jnp.inf)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1)
    o = jnp.einsum("bkgts,bskd->btkgd", p_BKGTS, v, precision=_DOT_PRECISION, preferred_element_type=dtype)
    return o.reshape(B, T, H, D).astype(q_BTHD.dtype)


# --------------------------------------------------------------------------- #
# Argument handling
# --------------------------------------------------------------------------- #


def _check_inputs(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    *,
    causal: bool,
    sliding_window: int | None,
) -> None:
    """Fails early with a readable message instead of deep inside lowering."""
    if q_BTHD.ndim != 4 or k_BSKD.ndim != 4 or k_BSKD.shape != v_BSKD.shape:
        raise ValueError(
            f"expected q [B,T,H,D] and k, v [B,S,K,D] of equal shape; got "
            f"{q_BTHD.shape}, {k_BSKD.shape}, {v_BSKD.shape}"
        )
    B, T, H, D = q_BTHD.shape
    Bk, S, K, Dk = k_BSKD.shape
    if Bk != B or Dk != D:
        raise ValueError(f"batch/head_dim mismatch: q {q_BTHD.shape}, k {k_BSKD.shape}")
    if H % K:
        raise ValueError(f"number of KV heads {K} must divide number of query heads {H}")
    if D > max(SUPPORTED_HEAD_DIMS):
        raise ValueError(f"head_dim {D} > {max(SUPPORTED_HEAD_DIMS)} is not supported")
    if causal and T != S:
        raise ValueError(f"causal/sliding-window attention needs T == S, got T={T}, S={S}")
    if sliding_window is not None and not causal:
        raise ValueError("sliding_window is causal by definition; pass causal=True")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    for x in (q_BTHD, k_BSKD, v_BSKD):
        if x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
            raise ValueError(f"unsupported dtype {x.dtype}; use bf16, fp16 or fp32")


def _padded_head_dim(D: int) -> int:
    return next(d for d in SUPPORTED_HEAD_DIMS if d >= D)


def _fit_block(block: int, seq: int) -> int:
    """Caps a tile at the sequence length (rounded to a power of two >= 16)."""
    if block < _MIN_BLOCK or block & (block - 1):
        raise ValueError(f"block sizes must be powers of two >= {_MIN_BLOCK}, got {block}")
    return min(block, max(_MIN_BLOCK, 1 << (seq - 1).bit_length()))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_to(x_BTHD: jax.Array, seq: int, head_dim: int) -> jax.Array:
    _, T, _, D = x_BTHD.shape
    if (T, D) == (seq, head_dim):
        return x_BTHD
    return jnp.pad(x_BTHD, ((0, 0), (0, seq - T), (0, 0), (0, head_dim - D)))


# --------------------------------------------------------------------------- #
# Masking and loop bounds (shared by all three kernels)
# --------------------------------------------------------------------------- #


def _mask(rows: jax.Array, cols: jax.Array, *, causal: bool, window: int | None, seq_k: int) -> jax.Array:
    """True where query ``rows`` may attend key ``cols`` (broadcasting)."""
    valid = cols < seq_k
    if causal:
        valid = valid & (cols <= rows)
    if window is not None:
        valid = valid & (cols > rows - window)
    return valid


def _cdiv(a: jax.Array, b: int) -> jax.Array:
    """Ceil division for non-negative ``a`` (lax.div truncates, which is exact here)."""
    return lax.div(a + (b - 1), b)


def _clamp(x: jax.Array, lo: jax.Array | int, hi: jax.Array | int) -> jax.Array:
    return jnp.minimum(jnp.maximum(x, lo), hi)


def _kv_blocks(q_start: jax.Array, cfg: _Config) -> tuple[jax.Array, ...]:
    """Key-block ranges for the query block at ``q_start``.

    Returns ``lo <= full_lo <= full_hi <= hi``: blocks in [lo, hi) hold at least
    one visible key for some row of the tile, blocks in [full_lo, full_hi) are
    visible to every row (no mask needed). Everything else is skipped.
    """
    bq, bk = cfg.block_q, cfg.block_k
    zero = jnp.int32(0)
    hi = jnp.int32(pl.cdiv(cfg.seq_k, bk))
    full_hi = jnp.int32(cfg.seq_k // bk)
    lo = full_lo = zero
    if cfg.causal:
        hi = jnp.minimum(hi, _cdiv(q_start + bq, bk))
        full_hi = jnp.minimum(full_hi, lax.div(q_start + 1, bk))
    if cfg.window is not None:
        lo = lax.div(jnp.maximum(q_start - cfg.window + 1, zero), bk)
        full_lo = _cdiv(jnp.maximum(q_start + bq - cfg.window, zero), bk)
    full_lo = _clamp(full_lo, lo, hi)
    full_hi = _clamp(full_hi, full_lo, hi)
    return lo, full_lo, full_hi, hi


def _q_blocks(k_start: jax.Array, cfg: _Config) -> tuple[jax.Array, ...]:
    """Query-block ranges for the key block at ``k_start`` (dK/dV kernel).

    Same contract as :func:`_kv_blocks` with the roles swapped. Padded keys
    need no mask here: their dK/dV rows are sliced away by the caller.
    """
    bq, bk = cfg.block_q, cfg.block_k
    zero = jnp.int32(0)
    hi = full_hi = jnp.int32(pl.cdiv(cfg.seq_q, bq))
    lo = full_lo = zero
    if cfg.causal:
        lo = lax.div(k_start, bq)
        full_lo = _cdiv(k_start + bk - 1, bq)
    if cfg.window is not None:
        hi = jnp.minimum(hi, lax.div(k_start + bk + cfg.window - 2, bq) + 1)
        full_hi = jnp.minimum(full_hi, lax.div(k_start + cfg.window, bq))
    full_lo = _clamp(full_lo, lo, hi)
    full_hi = _clamp(full_hi, full_lo, hi)
    return lo, full_lo, full_hi, hi


def _masked_loop(bounds: tuple[jax.Array, ...], body, carry):
    """Runs ``body(i, carry, masked)`` over [lo, hi), masking only edge blocks."""
    lo, full_lo, full_hi, hi = bounds
    carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int] = (1, 0)) -> jax.Array:
    """2-D matmul with fp32 accumulation; ``contract`` picks the summed axes."""
    return lax.dot_general(
        a,
        b,
        (((contract[0],), (contract[1],)), ((), ())),
        precision=_DOT_PRECISION,
        preferred_element_type=jnp.float32,
    )


# --------------------------------------------------------------------------- #
# Kernels
# --------------------------------------------------------------------------- #


def _query_block(i: jax.Array, num_blocks: int, cfg: _Config) -> jax.Array:
    """Maps grid index to query block: with a causal mask the heaviest (last)
    blocks are launched first, so the short ones fill the tail of the wave."""
    return num_blocks - 1 - i if cfg.causal else i


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: _Config):
    """One query tile against its visible key tiles; writes O and base-2 LSE."""
    bq, bk = cfg.block_q, cfg.block_k
    q_start = _query_block(pl.program_id(0), pl.num_programs(0), cfg) * bq
    q = q_ref[...]
    rows = q_start + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)  # Broadcast in _mask.

    def body(kb, carry, *, masked):
        m_prev, denom_prev, acc = carry
        k_start = kb * bk
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        s = _dot(q, k, (1, 1)) * cfg.scale_log2
        if masked:
            cols = k_start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            keep = _mask(rows, cols, causal=cfg.causal, window=cfg.window, seq_k=cfg.seq_k)
            s = jnp.where(keep, s, -jnp.inf)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        # A row that has seen only masked keys keeps m = -inf; shift by 0 then
        # so exp2 gives exact zeros instead of NaN from (-inf) - (-inf).
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m_prev - m_safe)
        p = jnp.exp2(s - m_safe[:, None])
        denom_new = denom_prev * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return m_new, denom_new, acc

    D = q.shape[-1]
    init = (
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros((bq, D), jnp.float32),
    )
    m, denom, acc = _masked_loop(_kv_blocks(q_start, cfg), body, init)
    empty = denom == 0.0  # Only padded query rows can see no key at all.
    o_ref[...] = (acc / jnp.where(empty, 1.0, denom)[:, None]).astype(o_ref.dtype)
    # +inf makes the backward's exp2(s - lse) exactly 0 for such rows.
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, denom)))


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: _Config):
    """dQ for one query tile: dQ = scale * sum_j dS_ij K_j, P recomputed from LSE."""
    bq, bk = cfg.block_q, cfg.block_k
    q_start = _query_block(pl.program_id(0), pl.num_programs(0), cfg) * bq
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    rows = q_start + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)  # Broadcast in _mask.

    def body(kb, dq, *, masked):
        k_start = kb * bk
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        s = _dot(q, k, (1, 1)) * cfg.scale_log2
        if masked:
            cols = k_start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            keep = _mask(rows, cols, causal=cfg.causal, window=cfg.window, seq_k=cfg.seq_k)
            s = jnp.where(keep, s, -jnp.inf)
        p = jnp.exp2(s - lse[:, None])
        dp = _dot(do, v, (1, 1))
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = _masked_loop(_kv_blocks(q_start, cfg), body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: _Config):
    """dK, dV for one key tile, summed over every query head of its KV group.

    Works on transposed scores (keys x queries) so that dV = P^T dO and
    dK = dS^T Q are plain row-major MMAs.
    """
    bq, bk = cfg.block_q, cfg.block_k
    k_start = pl.program_id(0) * bk
    k, v = k_ref[...], v_ref[...]
    cols = k_start + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)  # Broadcast in _mask.
    group = q_ref.shape[1]
    bounds = _q_blocks(k_start, cfg)

    def head(g, carry):
        def body(qb, carry, *, masked):
            dk, dv = carry
            q_start = qb * bq
            q = q_ref[pl.ds(q_start, bq), g, :]
            do = do_ref[pl.ds(q_start, bq), g, :]
            lse = lse_ref[g, pl.ds(q_start, bq)]
            delta = delta_ref[g, pl.ds(q_start, bq)]
            s_t = _dot(k, q, (1, 1)) * cfg.scale_log2
            if masked:
                rows = q_start + lax.broadcasted_iota(jnp.int32, (1, bq), 1)
                keep = _mask(rows, cols, causal=cfg.causal, window=cfg.window, seq_k=cfg.seq_k)
                s_t = jnp.where(keep, s_t, -jnp.inf)
            p_t = jnp.exp2(s_t - lse[None, :])
            dv = dv + _dot(p_t.astype(do.dtype), do)
            dp_t = _dot(v, do, (1, 1))
            ds_t = p_t * (dp_t - delta[None, :])
            dk = dk + _dot(ds_t.astype(q.dtype), q)
            return dk, dv

        return _masked_loop(bounds, body, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# --------------------------------------------------------------------------- #
# pallas_call wrappers and custom VJP
# --------------------------------------------------------------------------- #


def _call(kernel, cfg: _Config, grid, in_specs, out_specs, out_shape, name: str):
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compat.triton_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name=name,
    )


def _query_major_specs(q_shape, S: int, K: int, cfg: _Config):
    """BlockSpecs for kernels gridded over (query block, batch, query head).

    K/V are passed whole along the sequence (the kernel slices its tiles) and
    their head index is ``h // G``: grouped-query attention without copies.
    """
    B, T, H, D = q_shape
    G, bq, nq, SQ = H // K, cfg.block_q, T // cfg.block_q, _compat.SQUEEZED

    def qb(i):
        return _query_block(i, nq, cfg)

    q_spec = pl.BlockSpec((SQ, bq, SQ, D), lambda i, b, h: (b, qb(i), h, 0))
    kv_spec = pl.BlockSpec((SQ, S, SQ, D), lambda i, b, h: (b, 0, lax.div(h, G), 0))
    row_spec = pl.BlockSpec((SQ, SQ, bq), lambda i, b, h: (b, h, qb(i)))
    return q_spec, kv_spec, row_spec


def _fwd(q_BTHD, k_BSKD, v_BSKD, cfg: _Config):
    B, T, H, D = q_BTHD.shape
    _, S, K, _ = k_BSKD.shape
    q_spec, kv_spec, lse_spec = _query_major_specs(q_BTHD.shape, S, K, cfg)
    return _call(
        _fwd_kernel,
        cfg,
        grid=(T // cfg.block_q, B, H),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, lse_spec],
        out_shape=[
            jax.ShapeDtypeStruct(q_BTHD.shape, q_BTHD.dtype),
            jax.ShapeDtypeStruct((B, H, T), jnp.float32),
        ],
        name="flash_attention_fwd",
    )(q_BTHD, k_BSKD, v_BSKD)


def _bwd(fwd_cfg: _Config, residuals, do_BTHD):
    cfg = fwd_cfg.for_backward()
    q_BTHD, k_BSKD, v_BSKD, o_BTHD, lse_BHT = residuals
    B, T, H, D = q_BTHD.shape
    _, S, K, _ = k_BSKD.shape
    G, bk, SQ = H // K, cfg.block_k, _compat.SQUEEZED
    delta_BHT = jnp.einsum(
        "bthd,bthd->bht",
        o_BTHD.astype(jnp.float32),
        do_BTHD.astype(jnp.float32),
        precision=_DOT_PRECISION,
    )

    q_spec, kv_spec, row_spec = _query_major_specs(q_BTHD.shape, S, K, cfg)
    dq_BTHD = _call(
        _dq_kernel,
        cfg,
        grid=(T // cfg.block_q, B, H),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q_BTHD.shape, q_BTHD.dtype),
        name="flash_attention_dq",
    )(q_BTHD, k_BSKD, v_BSKD, do_BTHD, lse_BHT, delta_BHT)

    group_spec = pl.BlockSpec((SQ, T, G, D), lambda j, b, kh: (b, 0, kh, 0))
    group_row_spec = pl.BlockSpec((SQ, G, T), lambda j, b, kh: (b, kh, 0))
    kv_block_spec = pl.BlockSpec((SQ, bk, SQ, D), lambda j, b, kh: (b, j, kh, 0))
    dk_BSKD, dv_BSKD = _call(
        _dkdv_kernel,
        cfg,
        grid=(S // bk, B, K),
        in_specs=[
            group_spec,
            kv_block_spec,
            kv_block_spec,
            group_spec,
            group_row_spec,
            group_row_spec,
        ],
        out_specs=[kv_block_spec, kv_block_spec],
        out_shape=[
            jax.ShapeDtypeStruct(k_BSKD.shape, k_BSKD.dtype),
            jax.ShapeDtypeStruct(v_BSKD.shape, v_BSKD.dtype),
        ],
        name="flash_attention_dkdv",
    )(q_BTHD, k_BSKD, v_BSKD, do_BTHD, lse_BHT, delta_BHT)
    return dq_BTHD, dk_BSKD, dv_BSKD


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash_attention(q_BTHD, k_BSKD, v_BSKD, cfg: _Config):
    """Attention on block-padded inputs; see :func:`flash_attention`."""
    return _fwd(q_BTHD, k_BSKD, v_BSKD, cfg)[0]


def _flash_attention_fwd(q_BTHD, k_BSKD, v_BSKD, cfg: _Config):
    o_BTHD, lse_BHT = _fwd(q_BTHD, k_BSKD, v_BSKD, cfg)
    return o_BTHD, (q_BTHD, k_BSKD, v_BSKD, o_BTHD, lse_BHT)


_flash_attention.defvjp(_flash_attention_fwd, _bwd)
