"""Device meshes and sharding by name: one table maps logical axis names to mesh axes.

Model code names its axes ("embed", "heads", ...); it never mentions devices. The mesh has four axes:
- data:   batch split, params replicated (data parallel);
- fsdp:   batch split, and params / grads / optimizer state split along "embed" (fully sharded data parallel);
- expert: batch split outside the mixture-of-experts layers, the experts split inside them (expert parallel,
          GShard): each device runs its experts on the tokens routed to them from every device of the axis;
- tensor: heads and the MLP hidden width split (Megatron tensor parallel: column-parallel QKV and MLP-in,
          row-parallel out-projections).

Activations are named too: model code calls `constrain(x, ("batch", None, "mlp"))`, which pins the layout only while
a function traced under `under_mesh` runs (a no-op otherwise, e.g. in tests and decoding), so the model module stays
free of devices. Rules that split heads or the MLP over tensor must divide exactly (`check_model_divides`); vocab and
embed fall back to replication when they don't divide (GPT-2's vocab 50257 divides nothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from llmjax.config import ModelConfig
from llmjax.errors import UserError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# logical axis -> mesh axes it is split over (None: replicated)
LOGICAL_RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": BATCH_AXES,
    "expert_batch": ("data", "fsdp"),  # the batch inside an MoE layer, where the expert axis splits the experts
    "expert": "expert",
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "latent": None,  # the rank of latent attention's compressed K/V (and query), small and shared by every head
    "layers": None,
}


def parse_mesh(spec: str, n_devices: int) -> dict[str, int]:
    """'data:2,fsdp:2,tensor:2' -> mesh axis sizes; one axis may be -1 (inferred); unnamed axes are 1.

    The expert axis appears in the result only when named, so dense layouts read as before.
    """
    sizes = {axis: 1 for axis in MESH_AXES if axis != "expert"}
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
    """A mesh with every axis of MESH_AXES; axes missing from `sizes` have size 1."""
    devices = devices if devices is not None else jax.devices()
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    return Mesh(np.asarray(devices[: math.prod(shape)]).reshape(shape), MESH_AXES)


def spec_for(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh | AbstractMesh) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes; a dimension its mesh axes don't divide is replicated."""
    parts: list[Any] = []
    used: set[str] = set()
    for name, dim in zip(axes, shape, strict=True):
        rule = LOGICAL_RULES.get(name) if name is not None else None
        mesh_axes = tuple(a for a in ((rule,) if isinstance(rule, str) else rule or ()) if a not in used)
        mesh_axes = tuple(a for a in mesh_axes if mesh.shape.get(a, 1) > 1)
        if mesh_axes and dim % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            parts.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
            used.update(mesh_axes)
        else:
            parts.append(None)
    return PartitionSpec(*parts)


def param_shardings(cfg: ModelConfig, params_shape: Any, param_axes: Any, mesh: Mesh) -> Any:
    """A NamedSharding per parameter, from its logical axis names (after checking tensor parallelism fits `cfg`)."""
    check_model_divides(cfg, mesh.shape)
    return jax.tree.map(
        lambda axes, p: NamedSharding(mesh, spec_for(axes, p.shape, mesh)),
        param_axes, params_shape, is_leaf=lambda x: isinstance(x, tuple),
    )


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Split the batch axis over data × fsdp × expert; other axes replicated."""
    parts: list[Any] = [None] * ndim
    parts[batch_axis] = BATCH_AXES
    return NamedSharding(mesh, PartitionSpec(*parts))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_shards(mesh: Mesh | AbstractMesh) -> int:
    return math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)


def check_batch_divides(batch_size: int, mesh: Mesh | AbstractMesh) -> None:
    shards = batch_shards(mesh)
    if batch_size % shards:
        names = "×".join(a for a in BATCH_AXES if a != "expert" or mesh.shape.get(a, 1) > 1)
        raise UserError(
            f"batch of {batch_size} sequences does not split over {names}={shards} devices: "
            f"use a batch_size (per micro-batch) divisible by {shards}"
        )


def check_model_divides(cfg: ModelConfig, mesh_shape: Mapping[str, int]) -> None:
    """Tensor parallelism splits whole K/V heads (each with its G query heads) and the MLP width: both must divide.

    Replicating them instead (as spec_for does for vocab) would silently turn tensor parallelism off.
    """
    e = mesh_shape.get("expert", 1)
    if cfg.n_experts and cfg.n_experts % e:
        raise UserError(
            f"n_experts={cfg.n_experts} does not split over expert={e}: use an expert axis size dividing n_experts"
        )
    t = mesh_shape.get("tensor", 1)
    if t == 1:
        return
    name = "n_head" if cfg.n_kv_head is None else "n_kv_head"
    if cfg.kv_heads % t:
        fits = [d for d in range(1, cfg.kv_heads + 1) if cfg.kv_heads % d == 0]
        raise UserError(
            f"{name}={cfg.kv_heads} does not split over tensor={t}: use a tensor size dividing {name} "
            f"({', '.join(map(str, fits))}) and put the other devices on data or fsdp"
        )
    if cfg.hidden_dim % t:
        raise UserError(
            f"MLP hidden width {cfg.hidden_dim} does not split over tensor={t}: use a tensor size dividing it "
            f"or set --mlp_hidden to a multiple of {t}"
        )
    if cfg.n_experts and cfg.expert_dim % t:
        raise UserError(
            f"expert hidden width {cfg.expert_dim} does not split over tensor={t}: set --expert_hidden to a "
            f"multiple of {t}"
        )


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation's layout by logical axis names while tracing under `under_mesh`; the identity otherwise.

    XLA's propagation usually finds the layout itself; constraints on the residual stream, the QKV projection and
    the MLP hidden stop it from choosing a replicated or differently split intermediate (and the extra all-gathers
    that come with it).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(axes, x.shape, mesh))


def under_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """`fn` that traces with `mesh` as the abstract mesh, so its `constrain` calls take effect (wrap before jit)."""

    def traced(*args: Any, **kwargs: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced


def process_batch_slice(mesh: Mesh) -> tuple[int, int]:
    """(index, count): this process feeds part `index` of the global batch cut into `count` equal row blocks.

    The batch axis is split over data×fsdp×expert; a process must supply the rows of every batch shard its devices
    hold. Usually that is 1/process_count of the batch, but a mesh that replicates the batch across processes (e.g.
    tensor:8 over two hosts) needs the same rows on each, so the slice comes from the mesh, not the process count.
    """
    shards = batch_shards(mesh)
    batch_dims = [MESH_AXES.index(a) for a in BATCH_AXES]
    batch_shape = [mesh.devices.shape[i] for i in batch_dims]
    shard_of_device = {
        d.id: int(np.ravel_multi_index([index[i] for i in batch_dims], batch_shape))
        for index, d in np.ndenumerate(mesh.devices)
    }
    mine = sorted({shard_of_device[d.id] for d in mesh.local_devices})
    count = shards // len(mine)
    index = mine[0] // len(mine)
    if mine != list(range(index * len(mine), (index + 1) * len(mine))):
        raise UserError(
            f"this process's devices hold batch shards {mine} of {shards}, not one contiguous block: "
            "order the mesh so that each process's devices sit on consecutive data/fsdp positions"
        )
    return index, count


def bytes_per_device(tree: Any) -> int:
    """The most bytes any one device holds of a pytree of jax arrays (its shards, replicas counted per device)."""
    per_device: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
    return max(per_device.values())


def memory_report(compiled: Any) -> dict[str, int]:
    """Per-device bytes of a compiled computation from XLA's memory analysis; `peak` = arguments + outputs +
    temporaries − outputs aliased onto donated arguments."""
    m = compiled.memory_analysis()
    report = {
        "argument": m.argument_size_in_bytes,
        "output": m.output_size_in_bytes,
        "alias": m.alias_size_in_bytes,
        "temp": m.temp_size_in_bytes,
        "generated_code": m.generated_code_size_in_bytes,
    }
    report["peak"] = report["argument"] + report["output"] - report["alias"] + report["temp"]
    return report
