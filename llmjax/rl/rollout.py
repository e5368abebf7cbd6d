"""Rollouts shared by every post-training loss: sampling, the prompt/response/padding layout, log-probs, aggregation.

A rollout row is a prompt left-padded to width P followed by N response slots:

    slot   0 .. P-1                 P .. P+N-1
           [PAD PAD p0 p1 p2 ]      [r0 r1 EOS PAD PAD]
            ^ padding  ^ prompt      ^ response  ^ padding (after the stop token)

exactly the layout `llmjax.generate` decodes into, so log-probs recomputed here with teacher forcing (same positions
counted from the first real token, same attention mask over padding, same temperature) equal the sampler's.
Losses take per-token weights (`aggregation_weights`) computed once per rollout batch, so the aggregate is the
same however the batch is split into micro-batches.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import model
from llmjax.config import ModelConfig
from llmjax.generate import SamplingConfig, cache_slots, cache_step_mask, generate, prefill
from llmjax.train import Batch, LossFn

Rollout = dict[str, jax.Array]  # prompt_BP, prompt_lens_B, tokens_BN, logp_BN, lengths_B, mask_BN


def pad_prompts(prompts: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts right-aligned in a fixed width P (one compiled shape for every batch): (prompt_BP, prompt_lens_B)."""
    out = np.full((len(prompts), width), pad_id, np.int32)
    for row, p in enumerate(prompts):
        out[row, width - len(p):] = p
    return out, np.array([len(p) for p in prompts], np.int32)


def pad_responses(responses: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Responses left-aligned in N slots, padded after their end: (tokens_BN, lengths_B)."""
    out = np.full((len(responses), width), pad_id, np.int32)
    for row, r in enumerate(responses):
        out[row, : len(r)] = r
    return out, np.array([len(r) for r in responses], np.int32)


def response_mask(lengths_B: jax.Array, n: int) -> jax.Array:
    """mask_BN: the response's own tokens (up to and including the stop token), not the padding after it."""
    return (jnp.arange(n)[None, :] < lengths_B[:, None]).astype(jnp.float32)


def layout_masks(prompt_lens_B: jax.Array, p: int, lengths_B: jax.Array, n: int) -> dict[str, jax.Array]:
    """Boolean [B, P+N] masks of the row layout: `prompt`, `response` and `padding` (they partition the row)."""
    slots_S = jnp.arange(p + n)
    prompt_BS = (slots_S[None] >= p - prompt_lens_B[:, None]) & (slots_S[None] < p)
    response_BS = (slots_S[None] >= p) & (slots_S[None] < p + lengths_B[:, None])
    return {"prompt": prompt_BS, "response": response_BS, "padding": ~(prompt_BS | response_BS)}


def token_logprobs(
    params: model.Params,
    prompt_BP: jax.Array,
    prompt_lens_B: jax.Array,
    tokens_BN: jax.Array,
    cfg: ModelConfig,
    temperature: float = 1.0,
    group_size: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced (logp_BN, entropy_BN) of each response slot under softmax(logits / temperature).

    One forward pass over prompt + response. Positions count from each row's first real token and left padding is
    masked out of attention, as in `generate`, so the result matches the sampler's log-probs.

    With `group_size` G > 1 the caller promises that rows b·G .. b·G+G-1 share one prompt (the layout of
    `sample_groups`): each prompt is run once into a KV cache that its G responses attend to. Same log-probs, but
    the matmuls see P/G + N tokens per row instead of P + N (GRPO's train step is matmul-bound).
    """
    if group_size > 1:
        h_BND = _shared_prompt_hidden(params, prompt_BP, prompt_lens_B, tokens_BN, cfg, group_size)
    else:
        h_BND = row_hidden(params, prompt_BP, prompt_lens_B, tokens_BN[:, :-1], cfg)[:, prompt_BP.shape[1] - 1:]
    logits_BNV = model.unembed(params, h_BND, cfg) / temperature
    logp_BNV = jax.nn.log_softmax(logits_BNV, axis=-1)
    logp_BN = jnp.take_along_axis(logp_BNV, tokens_BN[..., None], axis=-1)[..., 0]
    entropy_BN = -jnp.sum(jnp.exp(logp_BNV) * logp_BNV, axis=-1)
    return logp_BN, entropy_BN


def _shared_prompt_hidden(
    params: model.Params,
    prompt_BP: jax.Array,
    prompt_lens_B: jax.Array,
    tokens_BN: jax.Array,
    cfg: ModelConfig,
    group_size: int,
) -> jax.Array:
    """h_BND: the states before each response token, the prompt run once per group of `group_size` rows."""
    B, P = prompt_BP.shape
    N = tokens_BN.shape[1]
    if B % group_size:
        raise ValueError(f"{B} rows do not split into groups of {group_size}")
    h_QPD, cache = prefill(params, prompt_BP[::group_size], prompt_lens_B[::group_size], cfg, P + N - 1)
    R, pad_B = cache_slots(cache), P - prompt_lens_B
    cache = jax.tree.map(lambda c_LQR: jnp.repeat(c_LQR, group_size, axis=1), cache)
    # The response's own slots (the last one predicts nothing), attending to the group's prompt in the cache.
    h_BTD, _ = model.trunk(
        params, tokens_BN[:, :-1], cfg, positions_BT=P + jnp.arange(N - 1)[None, :] - pad_B[:, None],
        mask_BTS=cache_step_mask(jnp.int32(P), N - 1, R, pad_B, cfg.sliding_window), cache=cache,
        cache_index=jnp.int32(P),
    )
    return jnp.concatenate([jnp.repeat(h_QPD[:, -1:], group_size, axis=0), h_BTD], axis=1)


def row_hidden(
    params: model.Params,
    prompt_BP: jax.Array,
    prompt_lens_B: jax.Array,
    tokens_BN: jax.Array,
    cfg: ModelConfig,
) -> jax.Array:
    """Final hidden states h_BSD of the whole row (S = P + N), with `token_logprobs`' positions and padding mask.

    Slot P − 1 + t holds the state before response token t (a value head reads it); slot P + len − 1 holds the
    state after the last response token (a reward head reads it).
    """
    P = prompt_BP.shape[1]
    N = tokens_BN.shape[1]
    tokens_BS = jnp.concatenate([prompt_BP, tokens_BN], axis=1)
    slots_S = jnp.arange(P + N)
    real_BS = ~layout_masks(prompt_lens_B, P, jnp.full_like(prompt_lens_B, N), N)["padding"]
    mask_BSS = (slots_S[None, None, :] <= slots_S[None, :, None]) & real_BS[:, None, :]
    if cfg.sliding_window is not None:
        mask_BSS &= slots_S[None, None, :] > slots_S[None, :, None] - cfg.sliding_window
    positions_BS = jnp.maximum(slots_S[None, :] - (P - prompt_lens_B)[:, None], 0)
    h_BSD, _ = model.trunk(params, tokens_BS, cfg, positions_BT=positions_BS, mask_BTS=mask_BSS)
    return h_BSD


@functools.partial(jax.jit, static_argnames=("cfg", "group_size", "max_new_tokens", "sc"))
def sample_groups(
    params: model.Params,
    prompt_BP: jax.Array,
    prompt_lens_B: jax.Array,
    key: jax.Array,
    *,
    cfg: ModelConfig,
    group_size: int,
    max_new_tokens: int,
    sc: SamplingConfig,
) -> Rollout:
    """`group_size` completions of every prompt (rows b·G .. b·G+G-1 answer prompt b), with their log-probs.

    `sc` must not filter (no top-k / top-p): the log-probs are then those of softmax(logits / temperature), the
    distribution `token_logprobs` recomputes for importance ratios.
    """
    prompt_RP = jnp.repeat(prompt_BP, group_size, axis=0)
    prompt_lens_R = jnp.repeat(prompt_lens_B, group_size, axis=0)
    tokens_RN, logp_RN, lengths_R = generate(
        params, prompt_BP, prompt_lens_B, key, cfg=cfg, max_new_tokens=max_new_tokens, sc=sc,
        samples_per_prompt=group_size,
    )
    return {"prompt_BP": prompt_RP, "prompt_lens_B": prompt_lens_R, "tokens_BN": tokens_RN, "logp_BN": logp_RN,
            "lengths_B": lengths_R, "mask_BN": response_mask(lengths_R, max_new_tokens)}


AGGREGATIONS = ("token_mean", "seq_mean", "constant")


def aggregation_weights(mask_BN: jax.Array, mode: str, n_micro: int = 1) -> jax.Array:
    """Per-token weights w_BN so that a loss is Σ w·ℓ over the whole rollout batch.

    token_mean: every response token counts once (1 / tokens in the batch; DAPO);
    seq_mean:   the mean over each sequence's tokens, then over sequences (1 / (len_b · B); GRPO);
    constant:   1 / (B · N) with N the generation budget, independent of lengths (Dr. GRPO).
    Scaled by `n_micro` because the train step averages the losses of its micro-batches.
    """
    B, N = mask_BN.shape
    if mode == "token_mean":
        w_BN = mask_BN / jnp.maximum(mask_BN.sum(), 1.0)
    elif mode == "seq_mean":
        w_BN = mask_BN / jnp.maximum(mask_BN.sum(-1, keepdims=True), 1.0) / B
    elif mode == "constant":
        w_BN = mask_BN / (B * N)
    else:
        raise ValueError(f"aggregation {mode!r} is not one of {AGGREGATIONS}")
    return w_BN * n_micro


def nll_loss(cfg: ModelConfig) -> LossFn:
    """Weighted negative log-likelihood of the responses: SFT, rejection-sampling fine-tuning, DPO's SFT term."""

    def loss_fn(params: model.Params, batch: Batch, key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        logp_BN, _ = token_logprobs(params, batch["prompt_BP"], batch["prompt_lens_B"], batch["tokens_BN"], cfg)
        return -jnp.sum(batch["weight_BN"] * logp_BN), {}

    return loss_fn


def add_micro_axis(batch: dict[str, np.ndarray | jax.Array], n_micro: int = 1) -> Batch:
    """Split every leaf's rows into `n_micro` micro-batches: the leading axis `make_train_step` expects."""
    return {k: jnp.reshape(v, (n_micro, v.shape[0] // n_micro, *v.shape[1:])) for k, v in batch.items()}
