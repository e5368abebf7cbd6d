"""LoRA (Hu et al. 2021): train a rank-r update W + (alpha/r)·A·B of chosen projections, the base weights frozen.

Pure functions over two pytrees, the base `params` of `llmjax.model` and the `adapters`; the model itself is unchanged:
every forward pass runs on `merge(params, adapters)`, so training differentiates through the merge and only the
adapters (and their optimizer state) are ever updated, while inference merges once and runs the plain model.

Targets name the linear maps of a block: q, k, v (the three parts of the fused `w_qkv`), o, up (`w_in`), gate
(`w_gate`, SwiGLU only) and down (`w_out`). Each target has its own A [L, *in, r] and B [L, r, *out], A Gaussian
with std 1/sqrt(fan-in) and B zero, so a fresh adapter leaves the model's outputs exactly unchanged.

q, k and v are adapted as if they were three separate projections (as in the paper, which adapts W_q and W_v):
the fused weight [L, D, K, G+2, E] holds, for each K/V head, its G query slots, then the key, then the value; a q
adapter's B has shape [L, r, K, G, E], a k or v adapter's [L, r, K, E], and the merge writes each update into its
own slots only. So "qv" leaves the key slot of `w_qkv` bit for bit equal to the base, and costs what LoRA on two
separate d×d maps would, not what a rank-r update of the whole fused map would.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import model, train
from llmjax.config import ModelConfig
from llmjax.errors import UserError

Params = model.Params
Adapters = dict[str, dict[str, jax.Array]]

# target -> the block weight it adapts
TARGET_WEIGHTS = {"q": "w_qkv", "k": "w_qkv", "v": "w_qkv", "o": "w_o", "gate": "w_gate", "up": "w_in", "down": "w_out"}
TARGET_GROUPS = {
    "all": ("q", "k", "v", "o", "gate", "up", "down"),
    "qv": ("q", "v"),
    "attn": ("q", "k", "v", "o"),
    "mlp": ("gate", "up", "down"),
}
_META_KEY = "__lora_meta__"


@dataclass(frozen=True)
class LoRAConfig:
    """rank r, alpha (the update is scaled by alpha/r) and targets: all | qv | attn | mlp | a comma list of names."""

    rank: int = 8
    alpha: float = 16.0
    targets: str = "all"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def target_names(self) -> tuple[str, ...]:
        if self.targets in TARGET_GROUPS:
            return TARGET_GROUPS[self.targets]
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())

    def validate(self) -> LoRAConfig:
        if self.rank < 1:
            raise UserError(f"LoRA rank={self.rank} must be a positive integer")
        if not self.alpha > 0:
            raise UserError(f"LoRA alpha={self.alpha} must be > 0 (the update is scaled by alpha/rank)")
        names = self.target_names
        unknown = [t for t in names if t not in TARGET_WEIGHTS]
        if unknown or not names or len(set(names)) != len(names):
            raise UserError(
                f"LoRA targets={self.targets!r} is not valid: use one of {', '.join(TARGET_GROUPS)} or a comma list "
                f"of distinct names from {', '.join(TARGET_WEIGHTS)}"
            )
        return self


def _layouts(cfg: ModelConfig, lcfg: LoRAConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple, tuple]]:
    """target -> (in shape, out shape, in axes, out axes) of the map it adapts; raises if the model lacks it.

    The group "all" means every listed projection the model has (no gate without SwiGLU); an explicit name the
    model lacks is an error.
    """
    blocks = model.param_specs(cfg)["blocks"]
    explicit = lcfg.targets != "all"
    layouts = {}
    for name in lcfg.target_names:
        weight = TARGET_WEIGHTS[name]
        spec = blocks.get(weight)
        if spec is None or not isinstance(spec, model.ParamSpec):
            if explicit:
                raise UserError(
                    f"LoRA target {name!r} adapts {weight}, which this model does not have (e.g. gate needs "
                    "--mlp=swiglu; MoE/MLA layers are not supported): choose other targets"
                )
            continue
        shape, axes = spec.shape[1:], spec.axes[1:]  # drop the stacked layer axis
        if weight == "w_qkv":  # [D, K, G+2, E] -> the slots of this target
            D, K, C, E = shape
            out = (K, C - 2, E) if name == "q" else (K, E)
            out_axes = axes[1:] if name == "q" else (axes[1], axes[3])
            layouts[name] = ((D,), out, axes[:1], out_axes)
        else:
            n_in = 2 if weight == "w_o" else 1  # w_o contracts (H, E)
            layouts[name] = (shape[:n_in], shape[n_in:], axes[:n_in], axes[n_in:])
    return layouts


def adapter_shapes(cfg: ModelConfig, lcfg: LoRAConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """target -> {"a": (L, *in, r), "b": (L, r, *out)}."""
    L, r = cfg.n_layer, lcfg.rank
    return {name: {"a": (L, *i, r), "b": (L, r, *o)} for name, (i, o, _, _) in _layouts(cfg, lcfg).items()}


def adapter_axes(cfg: ModelConfig, lcfg: LoRAConfig) -> dict[str, dict[str, tuple]]:
    """Logical axis names of the adapters (the rank axis is unnamed): for sharding and the optimizer's decay mask."""
    return {
        name: {"a": ("layers", *ia, None), "b": ("layers", None, *oa)}
        for name, (_, _, ia, oa) in _layouts(cfg, lcfg).items()
    }


def init_adapters(params: Params, cfg: ModelConfig, lcfg: LoRAConfig, key: jax.Array) -> Adapters:
    """Fresh adapters for `params`: A ~ N(0, 1/fan_in), B = 0, so merge(params, adapters) == params."""
    lcfg.validate()
    shapes = adapter_shapes(cfg, lcfg)
    specs = model.param_specs(cfg)["blocks"]
    for weight in {TARGET_WEIGHTS[name] for name in shapes}:
        if params["blocks"][weight].shape != specs[weight].shape:
            raise UserError(
                f"params have {weight} of shape {params['blocks'][weight].shape} but the config gives "
                f"{specs[weight].shape}: pass the ModelConfig the params were made with"
            )
    dtype = jnp.dtype(cfg.param_dtype)
    adapters: Adapters = {}
    for i, (name, s) in enumerate(sorted(shapes.items())):
        fan_in = int(np.prod(s["a"][1:-1]))
        a = jax.random.normal(jax.random.fold_in(key, i), s["a"], jnp.float32) / np.sqrt(fan_in)
        adapters[name] = {"a": a.astype(dtype), "b": jnp.zeros(s["b"], dtype)}
    return adapters


def delta(adapter: dict[str, jax.Array], scale: float) -> jax.Array:
    """scale·A·B as a stacked weight update [L, *in, *out] (one batched 2-D matmul per layer)."""
    a, b = adapter["a"], adapter["b"]
    L, r = a.shape[0], a.shape[-1]
    d = jnp.matmul(a.reshape(L, -1, r).astype(jnp.float32), b.reshape(L, r, -1).astype(jnp.float32))
    return scale * d.reshape(L, *a.shape[1:-1], *b.shape[2:])


def merge(params: Params, adapters: Adapters, lcfg: LoRAConfig) -> Params:
    """The effective parameters W + (alpha/r)·A·B; weights without an adapter are returned as they are."""
    blocks = dict(params["blocks"])
    deltas = {name: delta(ad, lcfg.scale) for name, ad in adapters.items()}
    if {"q", "k", "v"} & deltas.keys():
        w = blocks["w_qkv"]  # [L, D, K, G+2, E]
        L, D, K, C, E = w.shape
        q = deltas.get("q", jnp.zeros((L, D, K, C - 2, E), jnp.float32))
        k, v = (deltas.get(n, jnp.zeros((L, D, K, E), jnp.float32))[..., None, :] for n in ("k", "v"))
        blocks["w_qkv"] = (w + jnp.concatenate([q, k, v], axis=3)).astype(w.dtype)
    for name, d in deltas.items():
        if name not in ("q", "k", "v"):
            weight = TARGET_WEIGHTS[name]
            blocks[weight] = (blocks[weight] + d).astype(blocks[weight].dtype)
    return {**params, "blocks": blocks}


def lm_loss(base: Params, cfg: ModelConfig, lcfg: LoRAConfig) -> Any:
    """`llmjax.train.lm_loss` as a function of the adapters alone: gradients reach the adapters, never `base`.

    Build it inside the jitted function that receives `base` as an argument, so the base is a traced input rather
    than a constant baked into the compiled program.
    """
    base_loss = train.lm_loss(cfg)

    def loss_fn(adapters: Adapters, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
        return base_loss(merge(base, adapters, lcfg), batch, key)

    return loss_fn


def new_state(adapters: Adapters, optimizer: Any) -> dict[str, Any]:
    """A train state (as `llmjax.train.make_train_step` expects) whose params are the adapters only."""
    return {"step": jnp.int32(0), "params": adapters, "opt_state": optimizer.init(adapters)}


def trainable_fraction(params: Params, adapters: Adapters) -> float:
    """Adapter parameters over base-model parameters."""
    return model.count_params(adapters) / model.count_params(params)


# ------------------------------------------------------------------------------------------------- save / load


def save_adapters(path: str | os.PathLike, adapters: Adapters, lcfg: LoRAConfig) -> None:
    """Write the adapters alone (an .npz with the LoRA config in it), atomically."""
    path = os.fspath(path)
    arrays = {f"{name}/{part}": np.asarray(x) for name, ad in adapters.items() for part, x in ad.items()}
    arrays[_META_KEY] = np.frombuffer(json.dumps(asdict(lcfg)).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".adapters-", dir=directory)
    with os.fdopen(fd, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)


def load_adapters(path: str | os.PathLike, cfg: ModelConfig) -> tuple[Adapters, LoRAConfig]:
    """Adapters saved by `save_adapters`, checked against the model `cfg` they are to be merged into."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"no adapter file at {path}: pass the path save_adapters wrote")
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in f.files}
        lcfg = LoRAConfig(**json.loads(arrays.pop(_META_KEY).tobytes().decode()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not an adapter file written by llmjax.lora.save_adapters ({e})") from None
    lcfg.validate()
    expected = adapter_shapes(cfg, lcfg)
    found = {k: tuple(v.shape) for k, v in arrays.items()}
    wanted = {f"{n}/{p}": s for n, parts in expected.items() for p, s in parts.items()}
    if found != wanted:
        diff = sorted(set(found.items()) ^ set(wanted.items()))
        raise UserError(
            f"adapters in {path} do not fit this model (first mismatch: {diff[0][0]} {diff[0][1]}; the model needs "
            f"{wanted.get(diff[0][0], 'no such adapter')}): load them into the model they were trained for"
        )
    adapters = {n: {p: jnp.asarray(arrays[f"{n}/{p}"]) for p in parts} for n, parts in expected.items()}
    return adapters, lcfg
