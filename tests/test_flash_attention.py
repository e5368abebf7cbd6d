"""Flash attention kernels vs. a float32 jnp reference, in Pallas interpret mode.

Each parametrization covers several axes at once (masking, head grouping,
head dim, ragged length, dtype, block shape) so every axis is exercised
without running the full cartesian product.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.flash_attention import flash_attention, reference_attention


def _rel_l2(x: jax.Array, ref: jax.Array) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _inputs(B, T, S, H, K, D, dtype, seed=0):
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, S, K, D), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, S, K, D), jnp.float32).astype(dtype)
    do = jax.random.normal(kd, (B, T, H, D), jnp.float32).astype(dtype)
    return q, k, v, do


# Interpret-mode kernels are big XLA while loops; -O0 compiles them ~3x faster.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _compiled_value_and_grads(fn, q, k, v, do):
    """Compiles ``(q, k, v, do) -> (o, dq, dk, dv)`` of ``fn`` once."""

    def run(q, k, v, do):
        o, vjp = jax.vjp(fn, q, k, v)
        return (o, *vjp(do))

    return jax.jit(run).lower(q, k, v, do).compile(_FAST_COMPILE)


def _value_and_grads(fn, q, k, v, do):
    return _compiled_value_and_grads(fn, q, k, v, do)(q, k, v, do)


# (B, T, S, H, K, D, causal, window, blocks) with blocks = (q, k, q_bwd, k_bwd).
F32_CASES = {
    "causal_mha_d64_ragged": (1, 40, 40, 2, 2, 64, True, None, (16, 16, 16, 16)),
    "noncausal_mha_d128_cross": (1, 40, 56, 2, 2, 128, False, None, (16, 32, 32, 16)),
    "causal_gqa_8to2_d64": (1, 64, 64, 8, 2, 64, True, None, (32, 16, 16, 32)),
    "causal_mqa_d128_ragged": (2, 37, 37, 4, 1, 128, True, None, (16, 16, 16, 16)),
    "window_gqa_8to2_d64_ragged": (1, 75, 75, 8, 2, 64, True, 20, (16, 32, 32, 16)),
    "window_mha_d128": (1, 64, 64, 2, 2, 128, True, 16, (16, 16, 16, 16)),
    "noncausal_gqa_d64_ragged": (1, 33, 33, 4, 2, 64, False, None, (16, 16, 16, 16)),
    "headdim32_padded_to_64": (1, 32, 32, 2, 1, 32, True, None, (16, 16, 16, 16)),
}


def _blocks(q: int, k: int, q_bwd: int, k_bwd: int) -> dict[str, int]:
    return dict(block_q=q, block_k=k, block_q_bwd=q_bwd, block_k_bwd=k_bwd)


@pytest.mark.parametrize("case", F32_CASES.values(), ids=F32_CASES.keys())
def test_f32_matches_reference(case):
    B, T, S, H, K, D, causal, window, blocks = case
    q, k, v, do = _inputs(B, T, S, H, K, D, jnp.float32)
    kw = dict(causal=causal, sliding_window=window)
    got = _value_and_grads(lambda *a: flash_attention(*a, **kw, **_blocks(*blocks)), q, k, v, do)
    want = _value_and_grads(lambda *a: reference_attention(*a, **kw), q, k, v, do)
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert _rel_l2(g, w) <= 1e-5, (name, _rel_l2(g, w))


# (B, T, S, H, K, D, causal, window, blocks, dtype)
LOW_PRECISION_CASES = {
    "bf16_causal_gqa_8to2_d128": (1, 64, 64, 8, 2, 128, True, None, (32, 16, 16, 32), jnp.bfloat16),
    "bf16_window_mqa_d64_ragged": (1, 50, 50, 4, 1, 64, True, 24, (16, 16, 16, 16), jnp.bfloat16),
    "bf16_noncausal_mha_d64": (2, 48, 48, 2, 2, 64, False, None, (16, 16, 16, 16), jnp.bfloat16),
    "fp16_causal_gqa_4to2_d64_ragged": (1, 40, 40, 4, 2, 64, True, None, (16, 16, 16, 16), jnp.float16),
}


@pytest.mark.parametrize("case", LOW_PRECISION_CASES.values(), ids=LOW_PRECISION_CASES.keys())
def test_16bit_no_worse_than_xla_in_same_dtype(case):
    """bf16/fp16 kernel error (vs fp32 truth) must stay within 2x of what plain
    XLA attention computed in that dtype gets on the same inputs."""
    B, T, S, H, K, D, causal, window, blocks, dtype = case
    q, k, v, do = _inputs(B, T, S, H, K, D, dtype, seed=1)
    kw = dict(causal=causal, sliding_window=window)
    truth = _value_and_grads(lambda *a: reference_attention(*a, **kw), *(x.astype(jnp.float32) for x in (q, k, v, do)))
    xla = _value_and_grads(lambda *a: reference_attention(*a, **kw, dtype=dtype), q, k, v, do)
    flash = _value_and_grads(lambda *a: flash_attention(*a, **kw, **_blocks(*blocks)), q, k, v, do)
    for name, f, x, t in zip(("o", "dq", "dk", "dv"), flash, xla, truth, strict=True):
        assert f.dtype == dtype, name
        assert _rel_l2(f, t) <= 2 * _rel_l2(x, t), (name, _rel_l2(f, t), _rel_l2(x, t))


def _poisoned(x: jax.Array, start: int, stop: int) -> jax.Array:
    return x.at[:, start:stop].set(jnp.nan)


def _check_finite_and_clean(got, clean, rows, what):
    assert np.isfinite(np.asarray(got[:, rows])).all(), f"{what}: NaN leaked into rows {rows}"
    np.testing.assert_allclose(got[:, rows], clean[:, rows], rtol=1e-5, atol=1e-5, err_msg=what)


@pytest.mark.parametrize("window", [None, 16], ids=["causal", "sliding_window"])
def test_masked_blocks_are_never_read(window):
    """NaN in a K/V (or Q) block that the mask hides from some rows must not
    reach those rows: masking alone would turn 0 * NaN into NaN, so a finite
    result proves the kernels skip the block instead of reading it."""
    B, T, H, K, D, blk = 1, 96, 2, 1, 64, 16
    q, k, v, do = _inputs(B, T, T, H, K, D, jnp.float32, seed=2)
    kw = dict(causal=True, sliding_window=window, **_blocks(blk, blk, blk, blk))
    run = _compiled_value_and_grads(lambda *a: flash_attention(*a, **kw), q, k, v, do)
    clean = run(q, k, v, do)

    if window is None:
        # K/V blocks 3.. lie above the diagonal of query blocks 0..2 (rows < 48).
        o, dq, _, _ = run(q, _poisoned(k, 48, T), _poisoned(v, 48, T), do)
        _check_finite_and_clean(o, clean[0], slice(0, 48), "o")
        _check_finite_and_clean(dq, clean[1], slice(0, 48), "dq")
        # Q blocks 0..2 lie above the diagonal of key blocks 3.. (dK/dV kernel).
        o, dq, dk, dv = run(_poisoned(q, 0, 48), k, v, do)
        for name, got, ref in (("o", o, clean[0]), ("dq", dq, clean[1]), ("dk", dk, clean[2]), ("dv", dv, clean[3])):
            _check_finite_and_clean(got, ref, slice(48, T), name)
    else:
        # With window 16, query rows >= 48 never need key blocks 0..1 (keys < 32).
        o, dq, _, _ = run(q, _poisoned(k, 0, 32), _poisoned(v, 0, 32), do)
        _check_finite_and_clean(o, clean[0], slice(48, T), "o")
        _check_finite_and_clean(dq, clean[1], slice(48, T), "dq")
        # Keys < 32 are only seen by query rows < 48: poison the rest of Q.
        _, _, dk, dv = run(_poisoned(q, 48, T), k, v, do)
        _check_finite_and_clean(dk, clean[2], slice(0, 32), "dk")
        _check_finite_and_clean(dv, clean[3], slice(0, 32), "dv")


def test_jit_scan_and_grad():
    """Works as a layer inside jit + lax.scan, differentiated end to end."""
    B, T, H, K, D, L = 1, 32, 4, 2, 64, 2
    q, k, v, _ = _inputs(B, T, T, H, K, D, jnp.float32, seed=3)
    wq = jax.random.normal(jax.random.PRNGKey(4), (L, D, D)) / np.sqrt(D)

    def make_loss(attn):
        def loss(wq_LDD, q):
            def layer(x, w):
                return attn(jnp.einsum("bthd,de->bthe", x, w, precision="highest"), k, v), None

            out, _ = jax.lax.scan(layer, q, wq_LDD)
            return jnp.sum(out**2)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(wq, q).compile(_FAST_COMPILE)

    got = make_loss(lambda *a: flash_attention(*a, **_blocks(16, 16, 16, 16)))(wq, q)
    want = make_loss(reference_attention)(wq, q)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert _rel_l2(g, w) <= 1e-5


def test_rejects_bad_arguments():
    # numpy inputs: argument checks run before any JAX computation.
    q, k, v = (
        np.zeros((1, 16, 4, 64), np.float32),
        np.zeros((1, 16, 2, 64), np.float32),
        np.zeros((1, 16, 2, 64), np.float32),
    )
    with pytest.raises(ValueError, match="head_dim"):
        flash_attention(*(np.zeros((1, 16, 4, 256), np.float32) for _ in range(3)))
    with pytest.raises(ValueError, match="must divide"):
        flash_attention(q, np.zeros((1, 16, 3, 64), np.float32), np.zeros((1, 16, 3, 64), np.float32))
    with pytest.raises(ValueError, match="causal"):
        flash_attention(q, k, v, causal=False, sliding_window=8)
    with pytest.raises(ValueError, match="power"):
        flash_attention(q, k, v, block_q=24)
