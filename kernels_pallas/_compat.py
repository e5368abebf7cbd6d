"""The one place that knows how the Pallas/Triton API differs across JAX versions.

Kernels import everything version-sensitive from here, so a JAX upgrade means
editing this file only. Verified against the installed JAX 0.10.2 sources:

* ``jax.experimental.pallas.triton.CompilerParams(num_warps, num_stages)``
  selects the Triton lowering; ``pl.pallas_call`` without it lowers through
  Mosaic GPU when ``jax_pallas_use_mosaic_gpu`` is set (default since 0.9).
  Older releases called the class ``TritonCompilerParams`` or took a plain
  ``{"triton": {...}}`` dict.
* the Triton custom call is ``__gpu$xla.gpu.triton`` (jaxlib <= 0.10.2): its
  ``mhlo.backend_config`` holds the Triton module as raw MLIR bytecode in the
  ``ir`` string attribute. Later jaxlibs compile ahead of time into
  ``triton_kernel_call_ffi`` whose ``opaque`` config is a zlib-compressed proto.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Custom-call targets the Triton Pallas lowering can emit, newest first.
TRITON_CUSTOM_CALL_TARGETS: tuple[str, ...] = (
    "triton_kernel_call_ffi",
    "__gpu$xla.gpu.triton",
    "triton_kernel_call",
)

# A BlockSpec dimension that is squeezed out of the kernel's Ref.
SQUEEZED: Any = getattr(pl, "squeezed", None)


def triton_params(num_warps: int | None, num_stages: int | None) -> Any:
    """Compiler params that force the Triton backend for a ``pallas_call``."""
    if hasattr(plgpu, "CompilerParams"):
        return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    if hasattr(plgpu, "TritonCompilerParams"):  # JAX 0.4.3x - 0.5
        return plgpu.TritonCompilerParams(num_warps=num_warps, num_stages=num_stages)
    return {"triton": {"num_warps": num_warps, "num_stages": num_stages}}


def resolve_interpret(interpret: bool | None) -> bool:
    """``None`` means: interpret unless we are actually running on a GPU."""
    if interpret is None:
        return jax.default_backend() != "gpu"
    return bool(interpret)


def export_disabled_checks() -> list[jax.export.DisabledSafetyCheck]:
    """Checks to disable so ``jax.export`` accepts Triton custom calls.

    Triton calls carry no cross-version compatibility guarantee, which is fine
    for our use: the export is a lowering smoke test, not a shipped artifact.
    """
    return [jax.export.DisabledSafetyCheck.custom_call(t) for t in TRITON_CUSTOM_CALL_TARGETS]


def triton_modules_in(mlir_module_text: str) -> list[str]:
    """Decodes the Triton IR embedded in every Triton custom call of a module.

    Returns the textual ``tt`` dialect IR of each kernel so tests can check
    what the GPU will actually run (e.g. that a ``tt.dot`` takes fp8 operands).
    Only the raw-bytecode form of jaxlib <= 0.10.2 can be decoded; for the
    compiled-PTX form the PTX text is returned instead.
    """
    import zlib

    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    from jaxlib.triton import dialect as tt_dialect

    ctx = mlir.make_ir_context()
    tt_dialect.register_dialect(ctx)
    ctx.load_all_available_dialects()
    found: list[str] = []
    with ctx:
        module = ir.Module.parse(mlir_module_text)

        def visit(op: Any) -> None:
            op = op.operation
            if op.name == "stablehlo.custom_call":
                target = ir.StringAttr(op.attributes["call_target_name"]).value
                if target == "__gpu$xla.gpu.triton":
                    config = ir.DictAttr(op.attributes["mhlo.backend_config"])
                    bytecode = ir.StringAttr(config["ir"]).value_bytes
                    found.append(str(ir.Module.parse(bytecode)))
                elif target in TRITON_CUSTOM_CALL_TARGETS:
                    config = ir.DictAttr(op.attributes["mhlo.backend_config"])
                    blob = ir.StringAttr(config["opaque"]).value_bytes
                    found.append(zlib.decompress(blob).decode("latin-1"))
            for region in op.regions:
                for block in region.blocks:
                    for inner in block.operations:
                        visit(inner)

        visit(module.operation)
    return found
