"""A mixture-of-experts MLP: Mixtral's top-k routing, capacity-based dispatch, Switch and ST-MoE auxiliary losses.

Shapes: B sequences, T tokens each, D model width, E experts, K = top_k experts per token, C slots per expert,
F expert hidden width, L layers.

A router scores each token against every expert; the token goes to its top-K experts, weighted by the softmax
over those K logits (Mixtral). Experts are SwiGLU MLPs whose weights are stacked [E, D, F], so all of them run as
one batched matmul over the buffer [B, E, C, D] of the tokens routed to them. Each sequence is a routing group:
expert e takes at most C = capacity_factor · T · K / E of its tokens, so the work is E·C ≈ capacity_factor·K token
MLPs per token rather than E. A token past its expert's capacity skips that expert (the residual stream still
carries it) and is counted in `dropped_fraction`.

Slots are claimed in token order, so whether token t is dropped depends only on tokens ≤ t and the layer stays
causal. Sequence groups keep dispatch local to each batch shard; with an `expert` mesh axis the buffer is
re-split from batch to experts (an all-to-all) around the expert matmuls.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from llmjax.config import ModelConfig
from llmjax.sharding import constrain

Params = dict[str, Any]


def capacity(T: int, cfg: ModelConfig, dropless: bool = False) -> int:
    """Slots per expert in a group of T tokens; `dropless` gives every expert room for all T."""
    if dropless:
        return T
    return min(T, math.ceil(cfg.capacity_factor * T * cfg.moe_top_k / cfg.n_experts))


def assign_slots(experts_TK: jax.Array, n_experts: int, C: int) -> tuple[jax.Array, jax.Array]:
    """One group's routing as buffer indices: (slot_TK, token_M) with M = E·C buffer rows.

    slot_TK is the row e·C + c that token t's k-th choice e occupies, or M when expert e is already full;
    token_M is the token in each row, or T for an empty row. Choices claim rows in token order.
    """
    T, K = experts_TK.shape
    M = n_experts * C
    choice_NE = jax.nn.one_hot(experts_TK.reshape(T * K), n_experts, dtype=jnp.int32)  # N = T·K choices
    rank_N = jnp.sum(jnp.cumsum(choice_NE, axis=0) * choice_NE, axis=-1) - 1  # earlier choices of the same expert
    slot_N = jnp.where(rank_N < C, experts_TK.reshape(T * K) * C + rank_N, M)
    token_M = jnp.full((M,), T, jnp.int32).at[slot_N].set(jnp.arange(T * K, dtype=jnp.int32) // K, mode="drop")
    return slot_N.reshape(T, K), token_M


def load_balancing_loss(fraction_E: jax.Array, mean_prob_E: jax.Array) -> jax.Array:
    """Switch Transformer's E · Σ_e f_e · P_e: f the fraction of routed choices, P the mean router probability.

    It is 1 for uniform routing and larger otherwise; gradients flow through P (f comes from a top-k).
    """
    return fraction_E.shape[-1] * jnp.sum(fraction_E * mean_prob_E, axis=-1)


def mixture_of_experts(
    x_BTD: jax.Array, p: Params, cfg: ModelConfig, *, dropless: bool = False
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The routed experts' output out_BTD and this layer's statistics (see `aux_from_layers`)."""
    B, T, D = x_BTD.shape
    E, K = cfg.n_experts, cfg.moe_top_k
    C = capacity(T, cfg, dropless)
    dtype = x_BTD.dtype

    logits_BTE = jnp.dot(x_BTD, p["w_router"].astype(dtype), preferred_element_type=jnp.float32)
    top_logits_BTK, experts_BTK = jax.lax.top_k(logits_BTE, K)
    gates_BTK = jax.nn.softmax(top_logits_BTK, axis=-1)
    slot_BTK, token_BM = jax.vmap(assign_slots, in_axes=(0, None, None))(experts_BTK, E, C)

    # Dispatch: gather each buffer row's token (row T of the padded input is the zero token of empty rows).
    x_padded_BTD = jnp.concatenate([x_BTD, jnp.zeros((B, 1, D), dtype)], axis=1)
    x_BECD = jnp.take_along_axis(x_padded_BTD, token_BM[:, :, None], axis=1).reshape(B, E, C, D)
    # Expert-major for the matmuls: each expert's rows are then one contiguous [B·C, D] operand, which XLA's CPU
    # backend multiplies ~1.5x faster than the batch-major einsum (and, under an expert mesh axis, the transpose
    # is the all-to-all that sends each token to its expert's device).
    x_EBCD = constrain(x_BECD.transpose(1, 0, 2, 3), ("expert", "expert_batch", None, None))
    w_in_EDF, w_gate_EDF, w_out_EFD = (p[name].astype(dtype) for name in ("w_in", "w_gate", "w_out"))
    h_EBCF = jax.nn.silu(jnp.einsum("ebcd,edf->ebcf", x_EBCD, w_gate_EDF))
    h_EBCF = h_EBCF * jnp.einsum("ebcd,edf->ebcf", x_EBCD, w_in_EDF)
    h_EBCF = constrain(h_EBCF, ("expert", "expert_batch", None, "mlp"))
    y_EBCD = constrain(jnp.einsum("ebcf,efd->ebcd", h_EBCF, w_out_EFD), ("expert", "expert_batch", None, None))
    y_BECD = y_EBCD.transpose(1, 0, 2, 3)

    # Combine: each token sums its experts' outputs, weighted by its gates (a dropped choice reads the zero row).
    y_padded_BMD = jnp.concatenate([y_BECD.reshape(B, E * C, D), jnp.zeros((B, 1, D), dtype)], axis=1)
    y_BNKD = jnp.take_along_axis(y_padded_BMD, slot_BTK.reshape(B, T * K)[:, :, None], axis=1)
    out_BTD = jnp.einsum("btkd,btk->btd", y_BNKD.reshape(B, T, K, D), gates_BTK.astype(dtype))

    fraction_E = jnp.mean(jax.nn.one_hot(experts_BTK, E, dtype=jnp.float32), axis=(0, 1, 2))
    stats = {
        "moe_aux_loss": load_balancing_loss(fraction_E, jnp.mean(jax.nn.softmax(logits_BTE), axis=(0, 1))),
        "router_z_loss": jnp.mean(jax.nn.logsumexp(logits_BTE, axis=-1) ** 2),  # keeps router logits small
        "expert_fraction_E": fraction_E,
        "dropped_fraction": jnp.mean(slot_BTK == E * C, dtype=jnp.float32),
    }
    return out_BTD, stats


def aux_from_layers(stats_L: dict[str, jax.Array], cfg: ModelConfig) -> dict[str, jax.Array]:
    """The model's routing aux from the per-layer stats (stacked over L): losses and dropped fraction averaged over
    layers, so their coefficients do not depend on depth; `expert_fraction_LE` per layer. Zeros for a dense model."""
    if not stats_L:
        zero = jnp.zeros((), jnp.float32)
        return {"moe_aux_loss": zero, "router_z_loss": zero, "expert_fraction_LE": jnp.zeros((cfg.n_layer, 0)),
                "dropped_fraction": zero}
    return {
        "moe_aux_loss": stats_L["moe_aux_loss"].mean(),
        "router_z_loss": stats_L["router_z_loss"].mean(),
        "expert_fraction_LE": stats_L["expert_fraction_E"],
        "dropped_fraction": stats_L["dropped_fraction"].mean(),
    }
