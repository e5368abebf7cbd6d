"""Pallas kernels for NVIDIA GPUs (Triton backend), each beside a pure-JAX reference.

Every kernel runs in the Pallas interpreter on CPU (``interpret=None`` picks
that automatically off-GPU), which is how the test suite checks correctness on
machines without a GPU; see ``kernels_pallas/README.md``.
"""

from kernels_pallas.flash_attention import flash_attention, reference_attention
from kernels_pallas.fp8_matmul import (
    dequantize_blockwise,
    dequantize_rowwise,
    fp8_dot,
    quantize_blockwise,
    quantize_rowwise,
    reference_fp8_dot,
)

__all__ = [
    "dequantize_blockwise",
    "dequantize_rowwise",
    "flash_attention",
    "fp8_dot",
    "quantize_blockwise",
    "quantize_rowwise",
    "reference_attention",
    "reference_fp8_dot",
]
