"""GPU readiness without a GPU: export the kernels for CUDA and inspect the Triton IR.

``jax.export`` lowers all the way to the Triton dialect on a CPU-only host, so
these tests catch everything the interpreter cannot: non-power-of-two tiles,
unsupported primitives, wrong backend selection (Mosaic GPU instead of
Triton) and, for FP8, an MMA that silently runs on upcast operands.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from kernels_pallas import _compat
from kernels_pallas.flash_attention import flash_attention
from kernels_pallas.fp8_matmul import fp8_dot

TRITON_CALL = "__gpu$xla.gpu.triton"  # jaxlib 0.10.2's target; see _compat.


def _export_cuda(fn, *shapes) -> str:
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=_compat.export_disabled_checks())(
        *shapes
    )
    return exported.mlir_module()


def _dots(triton_ir: str) -> list[str]:
    return [line.strip() for line in triton_ir.splitlines() if "tt.dot " in line]


@pytest.mark.parametrize(
    "T,kv_heads,D,window",
    [(4096, 16, 128, None), (4096, 4, 128, None), (4096, 4, 128, 1024), (4000, 1, 64, None)],
    ids=["causal_mha", "causal_gqa", "sliding_window_gqa", "ragged_mqa_d64"],
)
def test_flash_attention_fwd_bwd_lowers_to_triton(T, kv_heads, D, window):
    B, H = 2, 16
    q = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, T, kv_heads, D), jnp.bfloat16)

    def loss(q, k, v):
        o = flash_attention(q, k, v, causal=True, sliding_window=window, interpret=False)
        return jnp.sum(o.astype(jnp.float32))

    module = _export_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv)
    assert module.count(TRITON_CALL) == 3  # forward, dQ, dK/dV
    assert "mosaic" not in module.lower()
    kernels = _compat.triton_modules_in(module)
    assert len(kernels) == 3
    names = sorted(re.search(r"tt.func public @(\w+)", ir).group(1) for ir in kernels)
    assert names == ["flash_attention_dkdv", "flash_attention_dq", "flash_attention_fwd"]
    for ir in kernels:
        # Loops with data-dependent bounds = block skipping survived lowering.
        assert "scf.for" in ir
        # The softmax runs in base 2 (libdevice exp2), never natural exp.
        assert "__nv_exp2f" in ir and "__nv_expf" not in ir
        for dot in _dots(ir):
            assert re.search(r"tensor<\d+x\d+xbf16> \* tensor<\d+x\d+xbf16> -> tensor<\d+x\d+xf32>", dot), dot


@pytest.mark.parametrize("grad_dtype", ["e4m3", "e5m2"])
def test_fp8_gemm_lowers_to_fp8_mma(grad_dtype):
    M, K, N = 4096, 7168, 2048
    x = jax.ShapeDtypeStruct((M, K), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((K, N), jnp.bfloat16)

    def loss(x, w):
        return jnp.sum(fp8_dot(x, w, grad_dtype=grad_dtype, interpret=False).astype(jnp.float32))

    module = _export_cuda(jax.value_and_grad(loss, argnums=(0, 1)), x, w)
    assert module.count(TRITON_CALL) == 3  # Y, dX, dW
    kernels = _compat.triton_modules_in(module)
    dots = [d for ir in kernels for d in _dots(ir)]
    assert len(dots) == 3
    fp8_mma = r"tensor<128x128xf8E4M3FN> \* tensor<128x128xf8E4M3FN> -> tensor<128x128xf32>"
    if grad_dtype == "e4m3":
        assert all(re.search(fp8_mma, d) for d in dots), dots
    else:
        # Forward stays e4m3 x e4m3; the mixed-format backward loads e5m2 tiles.
        assert re.search(fp8_mma, dots[0]), dots
        assert sum("f8E5M2" in ir for ir in kernels) == 2
