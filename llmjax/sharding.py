"""Device meshes and sharding by name: one table maps logical axis names to mesh axes.

Model code names its axes ("embed", "heads", ...); it never mentions devices. The mesh has three axes:
- data:   batch split, params replicated (data parallel);
- fsdp:   batch split, and params / grads / optimizer state split along "embed" (fully sharded data parallel);
- tensor: heads and the MLP hidden width split (Megatron tensor parallel: column-parallel QKV and MLP-in,
          row-parallel out-projections).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmjax.config import ModelConfig
from llmjax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes it is split over (None: replicated)
LOGICAL_RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
}


def parse_mesh(spec: str, n_devices: int) -> dict[str, int]:
    """'data:2,fsdp:2,tensor:2' -> sizes for every mesh axis; one axis may be -1 (inferred); unnamed axes are 1."""
    sizes = {axis: 1 for axis in MESH_AXES}
    inferred = None
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition(":")
        if name not in MESH_AXES or not value.lstrip("-").isdigit():
            raise UserError(f"bad mesh entry {part!r}: use axis:size with axis in {', '.join(MESH_AXES)}")
        size = int(value)
        if size == -1:
            if inferred is not None:
                raise UserError(f"mesh {spec!r} infers more than one axis (-1): give all sizes but one")
            inferred = name
        elif size < 1:
            raise UserError(f"mesh axis {name} has size {size}: sizes must be ≥ 1 (or -1 to infer)")
        sizes[name] = size
    known = math.prod(s for a, s in sizes.items() if a != inferred)
    if inferred is not None:
        if n_devices % known:
            raise UserError(f"mesh {spec!r}: {n_devices} devices are not divisible by {known}")
        sizes[inferred] = n_devices // known
    if math.prod(sizes.values()) != n_devices:
        raise UserError(
            f"mesh {spec!r} has {math.prod(sizes.values())} devices but {n_devices} are available: "
            "make the sizes multiply to the device count (or use -1 for one axis)"
        )
    return sizes


def make_mesh(sizes: dict[str, int], devices: list | None = None) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices[: math.prod(shape)]).reshape(shape), MESH_AXES)


def spec_for(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes; a dimension its mesh axes don't divide is replicated."""
    parts: list[Any] = []
    used: set[str] = set()
    for name, dim in zip(axes, shape, strict=True):
        rule = LOGICAL_RULES.get(name) if name is not None else None
        mesh_axes = tuple(a for a in ((rule,) if isinstance(rule, str) else rule or ()) if a not in used)
        mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
        if mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            parts.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
            used.update(mesh_axes)
        else:
            parts.append(None)
    return PartitionSpec(*parts)


def param_shardings(cfg: ModelConfig, params_shape: Any, param_axes: Any, mesh: Mesh) -> Any:
    """A NamedSharding per parameter, from its logical axis names."""
    return jax.tree.map(
        lambda axes, p: NamedSharding(mesh, spec_for(axes, p.shape, mesh)),
        param_axes, params_shape, is_leaf=lambda x: isinstance(x, tuple),
    )


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Split the batch axis over data × fsdp; other axes replicated."""
    parts: list[Any] = [None] * ndim
    parts[batch_axis] = ("data", "fsdp")
    return NamedSharding(mesh, PartitionSpec(*parts))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_divides(batch_size: int, mesh: Mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
        raise UserError(
            f"batch of {batch_size} sequences does not split over data×fsdp={shards} devices: "
            f"use a batch_size (per micro-batch) divisible by {shards}"
        )
