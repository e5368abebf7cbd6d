"""A decoder-only transformer as pure functions: GPT-2 and the Llama family are config switches of one model.

Read it top to bottom: the parameter layout and its initialisation, then the pieces of a block (normalisation,
rotary positions, grouped-query attention, DeepSeek's multi-head latent attention, the MLP or a mixture of experts),
the block, and the model (`trunk` + `apply`), then the KV cache and the loss.

Shapes are in the names: B batch, T query time, S key time, D model width, V vocabulary, L layers, H query heads,
K key/value heads, G = H // K query heads per K/V head, E head dim, F MLP hidden width; for latent attention
C latent rank, R RoPE key dim. (In `llmjax.moe` and the aux dict's `expert_fraction_LE`, E counts experts.)

Layer parameters are stacked along a leading L axis, so the layers can run under `lax.scan` (one compiled block,
fast compiles for deep models) or a Python loop (measured faster for small models on CPU).

The Q, K and V projections are one weight `w_qkv` of shape [D, K, G + 2, E]: for each K/V head, its G query heads,
then its key, then its value. One matmul computes all three, grouped-query attention needs no repeated K/V, and
splitting the K axis over devices keeps every query head with its K/V head (tensor parallelism).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from llmjax import moe
from llmjax.config import ModelConfig
from llmjax.sharding import constrain

Params = dict[str, Any]
Cache = dict[str, jax.Array]


# ---------------------------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: its shape, the logical name of each axis (for sharding) and how it is initialised."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str  # normal | residual (GPT-2's 1/sqrt(2·n_layer)-scaled normal) | zeros | ones


def param_specs(cfg: ModelConfig) -> Params:
    """The parameter tree of `cfg` as `ParamSpec`s: `init` materialises it, `llmjax.sharding` shards it by name."""
    L, D, V, F = cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.hidden_dim
    H, K, E = cfg.n_head, cfg.kv_heads, cfg.head_dim
    G = H // K

    def norm(*lead: int) -> Params:
        lead_axes = ("layers",) * len(lead)
        spec = {"scale": ParamSpec((*lead, D), (*lead_axes, "embed"), "ones")}
        if cfg.bias and cfg.norm == "layernorm":
            spec["bias"] = ParamSpec((*lead, D), (*lead_axes, "embed"), "zeros")
        return spec

    def swiglu(width: int, n_experts: int = 0) -> Params:
        """w_in, w_gate [.., D, width] and w_out [.., width, D], stacked over layers (and experts, if any)."""
        lead, names = ((L, n_experts), ("layers", "expert")) if n_experts else ((L,), ("layers",))
        return {
            "w_in": ParamSpec((*lead, D, width), (*names, "embed", "mlp"), "normal"),
            "w_gate": ParamSpec((*lead, D, width), (*names, "embed", "mlp"), "normal"),
            "w_out": ParamSpec((*lead, width, D), (*names, "mlp", "embed"), "residual"),
        }

    blocks: Params = {"attn_norm": norm(L)}
    if cfg.mla_kv_rank:
        # Latent attention: K and V are up-projected from a rank-C latent; positions enter only through an R-dim
        # RoPE key shared by all heads, matched against R extra query dims per head.
        C, R, Q = cfg.mla_kv_rank, cfg.mla_rope_dim, cfg.mla_q_rank
        if Q:
            blocks["w_dq"] = ParamSpec((L, D, Q), ("layers", "embed", "latent"), "normal")
            blocks["q_norm"] = {"scale": ParamSpec((L, Q), ("layers", "latent"), "ones")}
            blocks["w_uq"] = ParamSpec((L, Q, H, E + R), ("layers", "latent", "heads", "head_dim"), "normal")
        else:
            blocks["w_q"] = ParamSpec((L, D, H, E + R), ("layers", "embed", "heads", "head_dim"), "normal")
        blocks["w_dkv"] = ParamSpec((L, D, C + R), ("layers", "embed", "latent"), "normal")  # latent + RoPE key
        blocks["kv_norm"] = {"scale": ParamSpec((L, C), ("layers", "latent"), "ones")}
        blocks["w_uk"] = ParamSpec((L, C, H, E), ("layers", "latent", "heads", "head_dim"), "normal")
        blocks["w_uv"] = ParamSpec((L, C, H, E), ("layers", "latent", "heads", "head_dim"), "normal")
    else:
        blocks["w_qkv"] = ParamSpec((L, D, K, G + 2, E), ("layers", "embed", "kv_heads", None, "head_dim"), "normal")
    blocks["w_o"] = ParamSpec((L, H, E, D), ("layers", "heads", "head_dim", "embed"), "residual")
    blocks["mlp_norm"] = norm(L)
    if cfg.n_experts:
        router = ParamSpec((L, D, cfg.n_experts), ("layers", "embed", None), "normal")
        blocks["moe"] = {"w_router": router, **swiglu(cfg.expert_dim, cfg.n_experts)}
        if cfg.n_shared_experts:  # DeepSeek: experts every token uses, as one wider SwiGLU
            blocks["shared_mlp"] = swiglu(cfg.n_shared_experts * cfg.expert_dim)
    elif cfg.mlp == "swiglu":
        blocks.update(swiglu(F))
    else:
        blocks["w_in"] = ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal")
        blocks["w_out"] = ParamSpec((L, F, D), ("layers", "mlp", "embed"), "residual")
    if cfg.bias:
        if not cfg.mla_kv_rank:
            blocks["b_qkv"] = ParamSpec((L, K, G + 2, E), ("layers", "kv_heads", None, "head_dim"), "zeros")
        blocks["b_o"] = ParamSpec((L, D), ("layers", "embed"), "zeros")
        if not cfg.n_experts:
            blocks["b_in"] = ParamSpec((L, F), ("layers", "mlp"), "zeros")
            blocks["b_out"] = ParamSpec((L, D), ("layers", "embed"), "zeros")

    specs: Params = {"wte": ParamSpec((V, D), ("vocab", "embed"), "normal"), "blocks": blocks, "final_norm": norm()}
    if cfg.position == "learned":
        specs["wpe"] = ParamSpec((cfg.block_size, D), (None, "embed"), "normal")
    if not cfg.tie_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"), "normal")
    return specs


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def param_axes(cfg: ModelConfig) -> Params:
    """The logical axis names of every parameter, in the same tree as `init`'s output."""
    return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def init(cfg: ModelConfig, key: jax.Array) -> Params:
    """Fresh parameters: N(0, 0.02) weights, residual projections scaled by 1/sqrt(2·n_layer) (GPT-2), unit norms."""
    specs, treedef = jax.tree.flatten(param_specs(cfg), is_leaf=_is_spec)
    dtype = jnp.dtype(cfg.param_dtype)
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)

    def make(i: int, spec: ParamSpec) -> jax.Array:
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, dtype)
        if spec.init == "ones":
            return jnp.ones(spec.shape, dtype)
        std = residual_std if spec.init == "residual" else cfg.init_std
        return (std * jax.random.normal(jax.random.fold_in(key, i), spec.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [make(i, s) for i, s in enumerate(specs)])


def count_params(params: Params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def count_active_params(params: Params, cfg: ModelConfig) -> int:
    """Parameters a token touches: all of them, except that only top_k of the n_experts routed experts count."""
    if not cfg.n_experts:
        return count_params(params)
    experts = sum(params["blocks"]["moe"][name].size for name in ("w_in", "w_gate", "w_out"))
    return count_params(params) - experts * (cfg.n_experts - cfg.moe_top_k) // cfg.n_experts


# ---------------------------------------------------------------------------------------------------------------
# The pieces of a block


def linear(x: jax.Array, w: jax.Array, cfg: ModelConfig, n_contract: int = 1) -> jax.Array:
    """Contract the last `n_contract` axes of `x` with the first ones of `w`, in FP8 when `cfg.matmul == "fp8"`.

    Computed as one 2-D matmul [rows, k] × [k, n]: XLA's CPU backend runs its backward passes as plain GEMMs,
    where multi-axis contractions were measured several times slower.
    """
    w = w.astype(x.dtype)
    lead, k = x.shape[: x.ndim - n_contract], math.prod(w.shape[:n_contract])
    x_RK, w_KN = x.reshape(-1, k), w.reshape(k, -1)
    if cfg.matmul == "fp8":
        from kernels_pallas.fp8_matmul import fp8_dot

        y_RN = fp8_dot(x_RK, w_KN, out_dtype=x.dtype)
    else:
        y_RN = x_RK @ w_KN
    return y_RN.reshape(*lead, *w.shape[n_contract:])


def normalize(x_BTD: jax.Array, p: Params, cfg: ModelConfig) -> jax.Array:
    """LayerNorm (GPT-2) or RMSNorm (Llama), computed in float32 for stability."""
    x = x_BTD.astype(jnp.float32)
    if cfg.norm == "layernorm":
        x = x - x.mean(-1, keepdims=True)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * p["scale"].astype(jnp.float32)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y.astype(x_BTD.dtype)


def rotary(x: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """RoPE: rotate pairs (x_i, x_{i+E/2}) by angle position·theta^(-2i/E), so q·k depends only on their offset."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BTE = positions_BT[..., None].astype(jnp.float32) * freqs
    angle = angle_BTE.reshape(*angle_BTE.shape[:2], *(1,) * (x.ndim - 3), half)  # broadcast over head axes
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def causal_mask(T: int, S: int, sliding_window: int | None) -> jax.Array:
    """mask_TS[t, s]: query t (the last T of S positions) may attend key s."""
    q_pos = jnp.arange(T)[:, None] + (S - T)
    k_pos = jnp.arange(S)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def attention(
    q_BTKGE: jax.Array,
    k_BSKE: jax.Array,
    v_BSKE: jax.Array,
    mask_BTS: jax.Array | None,
    cfg: ModelConfig,
    key: jax.Array | None,
) -> jax.Array:
    """Softmax(q·kᵀ/sqrt(E))·v with G query heads sharing each K/V head; `mask_BTS=None` means plain causal."""
    B, T, K, G, E = q_BTKGE.shape
    if cfg.attention == "pallas" and mask_BTS is None:
        from kernels_pallas.flash_attention import flash_attention

        o_BTHE = flash_attention(
            q_BTKGE.reshape(B, T, K * G, E), k_BSKE, v_BSKE, causal=True, sliding_window=cfg.sliding_window
        )
        return o_BTHE.reshape(B, T, K, G, E)
    scores_BKGTS = jnp.einsum("btkge,bske->bkgts", q_BTKGE, k_BSKE, preferred_element_type=jnp.float32)
    scores_BKGTS = scores_BKGTS / math.sqrt(E)
    if mask_BTS is None:
        mask_BTS = causal_mask(T, k_BSKE.shape[1], cfg.sliding_window)[None]
    scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, -1e30)
    probs_BKGTS = dropout(jax.nn.softmax(scores_BKGTS, axis=-1), cfg.dropout, key).astype(v_BSKE.dtype)
    return jnp.einsum("bkgts,bske->btkge", probs_BKGTS, v_BSKE)


@dataclass(frozen=True)
class Context:
    """What every layer sees besides its own params: positions, the attention mask and where the cache is written."""

    positions_BT: jax.Array
    mask_BTS: jax.Array | None
    cache_index: jax.Array | None


def attend_cache(new: Cache, cache: Cache | None, cache_index: jax.Array | None) -> tuple[Cache, Cache | None]:
    """The keys (and values) a layer attends over, and its updated cache.

    Without a cache, just the chunk's own T entries. With one of R slots, the R slots followed by the T new entries
    (the mask says which slots hold real, visible positions), and the new entries are written to slots
    (cache_index + t) mod R. The cache is a ring buffer: with a sliding window of R only the last R entries are
    ever needed, so decoding memory stays constant however long the generation.
    """
    if cache is None:
        return new, None
    T, R = next(iter(new.values())).shape[1], next(iter(cache.values())).shape[1]
    kept = min(T, R)  # a chunk longer than the ring leaves only its last R entries behind
    slots = (cache_index + jnp.arange(T - kept, T)) % R
    updated = {name: c.at[:, slots].set(new[name][:, T - kept:].astype(c.dtype)) for name, c in cache.items()}
    attend = {name: jnp.concatenate([c.astype(new[name].dtype), new[name]], axis=1) for name, c in cache.items()}
    return attend, updated


def grouped_query_attention(
    h_BTD: jax.Array, p: Params, cache: Cache | None, key: jax.Array | None, ctx: Context, cfg: ModelConfig
) -> tuple[jax.Array, Cache | None]:
    """Multi-head attention with K ≤ H key/value heads (MHA, GQA, MQA): the output of every head, o_BTHE."""
    B, T, _ = h_BTD.shape
    G = cfg.n_head // cfg.kv_heads
    qkv_BTKJE = linear(h_BTD, p["w_qkv"], cfg)  # J = G + 2: the queries, the key, the value of each K/V head
    qkv_BTKJE = constrain(qkv_BTKJE, ("batch", None, "kv_heads", None, "head_dim"))  # whole K/V heads per device
    if "b_qkv" in p:
        qkv_BTKJE = qkv_BTKJE + p["b_qkv"].astype(qkv_BTKJE.dtype)
    q_BTKGE, k_BTKE, v_BTKE = qkv_BTKJE[..., :G, :], qkv_BTKJE[..., G, :], qkv_BTKJE[..., G + 1, :]
    if cfg.position == "rope":
        q_BTKGE = rotary(q_BTKGE, ctx.positions_BT, cfg.rope_theta)
        k_BTKE = rotary(k_BTKE, ctx.positions_BT, cfg.rope_theta)
    kv, cache = attend_cache({"k": k_BTKE, "v": v_BTKE}, cache, ctx.cache_index)
    o_BTKGE = attention(q_BTKGE, kv["k"], kv["v"], ctx.mask_BTS, cfg, key)
    return o_BTKGE.reshape(B, T, cfg.n_head, cfg.head_dim), cache


def latent_attention(
    h_BTD: jax.Array, p: Params, cache: Cache | None, key: jax.Array | None, ctx: Context, cfg: ModelConfig
) -> tuple[jax.Array, Cache | None]:
    """DeepSeek-V2's multi-head latent attention: every head's key and value are linear in one rank-C latent per
    token, which is all the cache holds besides an R-dim RoPE key shared by the heads.

    With k = c·W_uk and v = c·W_uv per head, q·k = (q·W_ukᵀ)·c and probs·v = (probs·c)·W_uv: the up-projections are
    absorbed into the query and the output, so per-head keys and values are never formed, in training or decoding.
    """
    E, C = cfg.head_dim, cfg.mla_kv_rank
    if "w_dq" in p:  # a low-rank query saves activation memory in training, not cache
        q_BTHX = linear(normalize(linear(h_BTD, p["w_dq"], cfg), p["q_norm"], cfg), p["w_uq"], cfg)
    else:
        q_BTHX = linear(h_BTD, p["w_q"], cfg)  # X = E + R: content dims, then the RoPE dims
    q_BTHX = constrain(q_BTHX, ("batch", None, "heads", "head_dim"))
    q_BTHE, q_rope_BTHR = q_BTHX[..., :E], rotary(q_BTHX[..., E:], ctx.positions_BT, cfg.rope_theta)
    ckv_BTY = linear(h_BTD, p["w_dkv"], cfg)  # Y = C + R: the latent and the shared RoPE key, in one matmul
    new = {
        "c_kv": normalize(ckv_BTY[..., :C], p["kv_norm"], cfg),
        "k_rope": rotary(ckv_BTY[..., C:], ctx.positions_BT, cfg.rope_theta),
    }
    kv, cache = attend_cache(new, cache, ctx.cache_index)
    c_BSC, k_rope_BSR = kv["c_kv"], kv["k_rope"]

    q_latent_BTHC = jnp.einsum("bthe,che->bthc", q_BTHE, p["w_uk"].astype(q_BTHE.dtype))
    scores_BHTS = jnp.einsum("bthc,bsc->bhts", q_latent_BTHC, c_BSC, preferred_element_type=jnp.float32)
    scores_BHTS += jnp.einsum("bthr,bsr->bhts", q_rope_BTHR, k_rope_BSR, preferred_element_type=jnp.float32)
    scores_BHTS = scores_BHTS / math.sqrt(E + cfg.mla_rope_dim)
    mask_BTS = ctx.mask_BTS
    if mask_BTS is None:
        mask_BTS = causal_mask(h_BTD.shape[1], c_BSC.shape[1], cfg.sliding_window)[None]
    scores_BHTS = jnp.where(mask_BTS[:, None], scores_BHTS, -1e30)
    probs_BHTS = dropout(jax.nn.softmax(scores_BHTS, axis=-1), cfg.dropout, key).astype(c_BSC.dtype)
    o_latent_BTHC = jnp.einsum("bhts,bsc->bthc", probs_BHTS, c_BSC)
    return jnp.einsum("bthc,che->bthe", o_latent_BTHC, p["w_uv"].astype(c_BSC.dtype)), cache


def mlp(x_BTD: jax.Array, p: Params, cfg: ModelConfig) -> jax.Array:
    """GELU MLP (GPT-2) or SwiGLU (Llama: silu(x·W_gate) ⊙ x·W_in)."""
    h_BTF = constrain(linear(x_BTD, p["w_in"], cfg), ("batch", None, "mlp"))  # column-parallel over tensor
    if "b_in" in p:
        h_BTF = h_BTF + p["b_in"].astype(h_BTF.dtype)
    if cfg.mlp == "swiglu":
        h_BTF = jax.nn.silu(linear(x_BTD, p["w_gate"], cfg)) * h_BTF
    else:
        h_BTF = jax.nn.gelu(h_BTF, approximate=False)  # exact erf GELU, as nanoGPT (GPT-2 used the tanh form)
    out_BTD = linear(h_BTF, p["w_out"], cfg)
    return out_BTD + p["b_out"].astype(out_BTD.dtype) if "b_out" in p else out_BTD


# ---------------------------------------------------------------------------------------------------------------
# The block and the model


def block(
    x_BTD: jax.Array,
    p: Params,
    cache: Cache | None,
    key: jax.Array | None,
    ctx: Context,
    cfg: ModelConfig,
) -> tuple[jax.Array, Cache | None, dict[str, jax.Array]]:
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    Returns the layer's updated KV cache and its routing statistics (`llmjax.moe`; empty for a dense MLP).
    """
    keys = jax.random.split(key, 3) if key is not None else (None, None, None)
    x_BTD = constrain(x_BTD, ("batch", None, None))  # the residual stream: split over the batch only
    h_BTD = normalize(x_BTD, p["attn_norm"], cfg)
    attend = latent_attention if cfg.mla_kv_rank else grouped_query_attention
    o_BTHE, cache = attend(h_BTD, p, cache, keys[0], ctx, cfg)
    attn_BTD = linear(o_BTHE, p["w_o"], cfg, n_contract=2)
    if "b_o" in p:
        attn_BTD = attn_BTD + p["b_o"].astype(attn_BTD.dtype)
    x_BTD = x_BTD + dropout(attn_BTD, cfg.dropout, keys[1])

    h_BTD = normalize(x_BTD, p["mlp_norm"], cfg)
    if cfg.n_experts:
        # Decoding never drops a token: capacity limits keep training batches balanced, not single steps.
        mlp_BTD, stats = moe.mixture_of_experts(h_BTD, p["moe"], cfg, dropless=ctx.cache_index is not None)
        if "shared_mlp" in p:
            mlp_BTD = mlp_BTD + mlp(h_BTD, p["shared_mlp"], cfg)
    else:
        mlp_BTD, stats = mlp(h_BTD, p, cfg), {}
    return x_BTD + dropout(mlp_BTD, cfg.dropout, keys[2]), cache, stats


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
}


def trunk(
    params: Params,
    tokens_BT: jax.Array,
    cfg: ModelConfig,
    *,
    positions_BT: jax.Array | None = None,
    mask_BTS: jax.Array | None = None,
    cache: Cache | None = None,
    cache_index: jax.Array | None = None,
    dropout_key: jax.Array | None = None,
    return_aux: bool = False,
) -> tuple[jax.Array, Cache | None] | tuple[jax.Array, Cache | None, dict[str, jax.Array]]:
    """Embed, run the layers, final norm: hidden states h_BTD (compute dtype) and the updated KV cache (and, with
    `return_aux`, the routing statistics of `llmjax.moe.aux_from_layers`).

    Training calls it with tokens only (causal mask, positions 0..T-1). Decoding passes explicit positions, a
    per-layer cache of R slots ([L, B, R, ...], see `init_cache`), the absolute slot `cache_index` of the first
    token, and a mask over the R cache slots followed by the T new tokens (see `attend_cache`).
    """
    dtype = jnp.dtype(cfg.compute_dtype)
    B, T = tokens_BT.shape
    if positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    x_BTD = params["wte"][tokens_BT].astype(dtype)
    if cfg.position == "learned":
        x_BTD = x_BTD + params["wpe"][positions_BT].astype(dtype)
    drop_key, layers_key = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
    x_BTD = dropout(x_BTD, cfg.dropout, drop_key)

    ctx = Context(positions_BT, mask_BTS, cache_index)
    layer_keys = jax.random.split(layers_key, cfg.n_layer) if layers_key is not None else None

    def layer(x: jax.Array, p: Params, c: Cache | None, k: jax.Array | None) -> tuple:
        return block(x, p, c, k, ctx, cfg)

    if cfg.remat != "none":
        layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat])

    if cfg.scan_layers:
        def scan_body(x: jax.Array, xs: tuple) -> tuple[jax.Array, tuple]:
            x, c, stats = layer(x, *xs)
            return x, (c, stats)

        x_BTD, (cache, stats_L) = jax.lax.scan(scan_body, x_BTD, (params["blocks"], cache, layer_keys))
    else:
        # Unstacked once: the gradient of the pieces is one concatenate, where indexing each layer's slice out of
        # the stacked [L, ...] params would pad every layer's gradient back to full size and add them up.
        per_layer = jax.tree.map(lambda a: list(jnp.unstack(a)), (params["blocks"], cache))
        new_caches, stats = [], []
        for i in range(cfg.n_layer):
            p_i, cache_i = jax.tree.map(lambda parts, i=i: parts[i], per_layer, is_leaf=lambda x: isinstance(x, list))
            x_BTD, c, s = layer(x_BTD, p_i, cache_i, None if layer_keys is None else layer_keys[i])
            new_caches.append(c)
            stats.append(s)
        if cache is not None:
            cache = jax.tree.map(lambda *cs: jnp.stack(cs), *new_caches)
        stats_L = jax.tree.map(lambda *ss: jnp.stack(ss), *stats)
    h_BTD = normalize(x_BTD, params["final_norm"], cfg)
    return (h_BTD, cache, moe.aux_from_layers(stats_L, cfg)) if return_aux else (h_BTD, cache)


def unembed(params: Params, h_BTD: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Logits in float32; with tied embeddings the output projection is the token embedding transposed."""
    w_DV = params["wte"].T if cfg.tie_embeddings else params["lm_head"]
    return jnp.dot(h_BTD, w_DV.astype(h_BTD.dtype), preferred_element_type=jnp.float32)


def apply(
    params: Params,
    tokens_BT: jax.Array,
    cfg: ModelConfig,
    *,
    dropout_key: jax.Array | None = None,
    return_aux: bool = False,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token logits_BTV for a batch of token sequences (training / scoring path).

    With `return_aux`, also (logits, aux): the mixture-of-experts losses and statistics `moe_aux_loss`,
    `router_z_loss`, `expert_fraction_LE`, `dropped_fraction` (zeros, and no experts, for a dense model).
    """
    h_BTD, _, aux = trunk(params, tokens_BT, cfg, dropout_key=dropout_key, return_aux=True)
    logits_BTV = unembed(params, h_BTD, cfg)
    return (logits_BTV, aux) if return_aux else logits_BTV


# ---------------------------------------------------------------------------------------------------------------
# The KV cache and the loss


def init_cache(cfg: ModelConfig, batch_size: int, length: int) -> Cache:
    """An empty cache for `length` positions per sequence, in the compute dtype: per-head keys and values, or MLA's
    latent and RoPE key. With a sliding window shorter than `length` it holds only `sliding_window` slots, used as
    a ring buffer (`attend_cache`)."""
    slots = length if cfg.sliding_window is None else min(length, cfg.sliding_window)
    lead = (cfg.n_layer, batch_size, slots)
    if cfg.mla_kv_rank:
        shapes = {"c_kv": (*lead, cfg.mla_kv_rank), "k_rope": (*lead, cfg.mla_rope_dim)}
    else:
        shapes = {"k": (*lead, cfg.kv_heads, cfg.head_dim), "v": (*lead, cfg.kv_heads, cfg.head_dim)}
    return {name: jnp.zeros(shape, cfg.compute_dtype) for name, shape in shapes.items()}


def kv_cache_bytes_per_token(cfg: ModelConfig) -> int:
    """Cache bytes per token over all layers: 2·L·K·E values (a key and a value per K/V head), L·(C + R) for MLA."""
    per_layer = cfg.mla_kv_rank + cfg.mla_rope_dim if cfg.mla_kv_rank else 2 * cfg.kv_heads * cfg.head_dim
    return cfg.n_layer * per_layer * jnp.dtype(cfg.compute_dtype).itemsize


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array | None = None) -> jax.Array:
    """Mean next-token negative log-likelihood in nats over the positions where `mask_BT` is true."""
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    nll_BT = logz_BT - target_logit_BT
    if mask_BT is None:
        return nll_BT.mean()
    return (nll_BT * mask_BT).sum() / jnp.maximum(mask_BT.sum(), 1)
