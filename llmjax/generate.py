"""Autoregressive decoding with a KV cache: temperature, top-k, top-p, batched prompts of any lengths, stop token.

Prompts are left-padded to a common length P so every row writes absolute slot P + i at decode step i; a row's
positions count from its first real token, and its padding slots are masked out of attention. The whole decode is
one `lax.while_loop` under `jit`, which stops early once every row has emitted the stop token.

With a sliding window W the cache keeps only W slots, a ring buffer (slot s lives at s mod W): decoding memory does
not grow with the number of generated tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import model
from llmjax.config import ModelConfig
from llmjax.errors import UserError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    stop_token: int | None = None  # rows end after emitting it; later slots hold pad_id
    pad_id: int = 0


def left_pad(prompts: list[list[int]] | list[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stack prompts of different lengths right-aligned: (prompt_BP, prompt_lens_B)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt needs at least one token (e.g. start sampling from a newline)")
    P = max(len(p) for p in prompts)
    out = np.full((len(prompts), P), pad_id, np.int32)
    for row, p in enumerate(prompts):
        out[row, P - len(p):] = np.asarray(p, np.int32)
    return out, np.array([len(p) for p in prompts], np.int32)


def filter_logits(logits_BV: jax.Array, top_k: int | None, top_p: float | None) -> jax.Array:
    """Keep the top-k logits and the smallest set whose probability reaches top_p; the rest become -inf."""
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_BV = jax.lax.top_k(logits_BV, top_k)[0][..., -1:]
        logits_BV = jnp.where(logits_BV < kth_BV, -jnp.inf, logits_BV)
    if top_p is not None and top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[..., ::-1]
        sorted_probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        mass_before_BV = jnp.cumsum(sorted_probs_BV, axis=-1) - sorted_probs_BV
        # The cutoff is the smallest logit whose preceding mass is still below top_p: the top token always stays.
        n_keep_B1 = jnp.sum(mass_before_BV < top_p, axis=-1, keepdims=True)
        cutoff_B1 = jnp.take_along_axis(sorted_BV, n_keep_B1 - 1, axis=-1)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return logits_BV


def sample_token(logits_BV: jax.Array, key: jax.Array, sc: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """A token per row and its log-probability under the same temperature (what RL ratios need)."""
    if sc.temperature == 0.0:
        token_B = jnp.argmax(logits_BV, axis=-1)
        logprobs_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    else:
        scaled_BV = filter_logits(logits_BV / sc.temperature, sc.top_k, sc.top_p)
        token_B = jax.random.categorical(key, scaled_BV, axis=-1)
        logprobs_BV = jax.nn.log_softmax(scaled_BV, axis=-1)
    return token_B.astype(jnp.int32), jnp.take_along_axis(logprobs_BV, token_B[:, None], axis=-1)[:, 0]


def cache_step_mask(start: jax.Array, T: int, R: int, pad_B: jax.Array, window: int | None) -> jax.Array:
    """mask_BT(R+T) for T tokens at absolute slots start.. of left-padded rows (pad_B padding slots each): over
    the R slots of a ring-buffer cache (`model.attend_cache`), then the T new tokens."""
    query_T = start + jnp.arange(T)
    # Ring slot r holds the latest absolute slot before `start` that is ≡ r (mod R); negative: never written.
    cached_R = start - 1 - (start - 1 - jnp.arange(R)) % R
    key_S = jnp.concatenate([cached_R, query_T])
    mask_BTS = (key_S[None, None, :] <= query_T[None, :, None]) & (key_S >= pad_B[:, None])[:, None, :]
    if window is not None:
        mask_BTS &= key_S[None, None, :] > query_T[None, :, None] - window
    return mask_BTS


def cache_slots(cache: model.Cache) -> int:
    """R: every slot of the sequence, or with a sliding window only the last `window` (a ring buffer)."""
    return next(iter(cache.values())).shape[2]


def prefill(
    params: model.Params, prompt_QP: jax.Array, prompt_lens_Q: jax.Array, cfg: ModelConfig, length: int
) -> tuple[jax.Array, model.Cache]:
    """Run left-padded prompts into a fresh KV cache for `length` slots in all: (h_QPD, cache)."""
    P = prompt_QP.shape[1]
    pad_Q = P - prompt_lens_Q
    cache = model.init_cache(cfg, prompt_QP.shape[0], length)
    positions_QP = jnp.maximum(jnp.arange(P)[None, :] - pad_Q[:, None], 0)
    mask_QPS = cache_step_mask(jnp.int32(0), P, cache_slots(cache), pad_Q, cfg.sliding_window)
    return model.trunk(
        params, prompt_QP, cfg, positions_BT=positions_QP, mask_BTS=mask_QPS, cache=cache, cache_index=jnp.int32(0)
    )


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sc", "samples_per_prompt"))
def generate(
    params: model.Params,
    prompt_QP: jax.Array,
    prompt_lens_Q: jax.Array,
    key: jax.Array,
    *,
    cfg: ModelConfig,
    max_new_tokens: int,
    sc: SamplingConfig = SamplingConfig(),
    samples_per_prompt: int = 1,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Decode `max_new_tokens` after left-padded prompts: (tokens_BN, logprobs_BN, lengths_B).

    `lengths_B` counts generated tokens up to and including the stop token; later slots are `pad_id`, logprob 0.
    With `samples_per_prompt` S, rows q·S .. q·S+S-1 continue prompt q (B = Q·S): each prompt is prefilled once and
    its cache copied to its S rows.
    """
    P = prompt_QP.shape[1]
    h_QPD, cache = prefill(params, prompt_QP, prompt_lens_Q, cfg, P + max_new_tokens)
    R = cache_slots(cache)
    logits_BV = jnp.repeat(model.unembed(params, h_QPD[:, -1], cfg), samples_per_prompt, axis=0)
    cache = jax.tree.map(lambda c_LQR: jnp.repeat(c_LQR, samples_per_prompt, axis=1), cache)
    pad_B = jnp.repeat(P - prompt_lens_Q, samples_per_prompt)
    B = pad_B.shape[0]
    step_mask = functools.partial(cache_step_mask, R=R, pad_B=pad_B, window=cfg.sliding_window)

    def cond(carry: tuple) -> jax.Array:
        i, _, _, _, _, done_B, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done_B)

    def body(carry: tuple) -> tuple:
        i, cache, logits_BV, tokens_BN, logprobs_BN, done_B, key = carry
        key, sub = jax.random.split(key)
        token_B, logprob_B = sample_token(logits_BV, sub, sc)
        token_B = jnp.where(done_B, sc.pad_id, token_B)
        tokens_BN = tokens_BN.at[:, i].set(token_B)
        logprobs_BN = logprobs_BN.at[:, i].set(jnp.where(done_B, 0.0, logprob_B))
        if sc.stop_token is not None:
            done_B = done_B | (token_B == sc.stop_token)
        slot = P + i
        h_B1D, cache = model.trunk(
            params, token_B[:, None], cfg, positions_BT=(slot - pad_B)[:, None], mask_BTS=step_mask(slot, 1),
            cache=cache, cache_index=slot,
        )
        return i + 1, cache, model.unembed(params, h_B1D, cfg)[:, 0], tokens_BN, logprobs_BN, done_B, key

    tokens_BN = jnp.full((B, max_new_tokens), sc.pad_id, jnp.int32)
    logprobs_BN = jnp.zeros((B, max_new_tokens), jnp.float32)
    done_B = jnp.zeros((B,), bool)
    carry = (jnp.int32(0), cache, logits_BV, tokens_BN, logprobs_BN, done_B, key)
    _, _, _, tokens_BN, logprobs_BN, _, _ = jax.lax.while_loop(cond, body, carry)
    if sc.stop_token is None:
        lengths_B = jnp.full((B,), max_new_tokens, jnp.int32)
    else:
        is_stop_BN = tokens_BN == sc.stop_token
        first_stop_B = jnp.argmax(is_stop_BN, axis=-1)
        lengths_B = jnp.where(is_stop_BN.any(-1), first_stop_B + 1, max_new_tokens).astype(jnp.int32)
    return tokens_BN, logprobs_BN, lengths_B


def check_fits(cfg: ModelConfig, prompt_len: int, max_new_tokens: int) -> None:
    """Learned position embeddings stop at block_size, so prompt + generation must fit in it."""
    if prompt_len + max_new_tokens > cfg.block_size:
        raise UserError(
            f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds block_size={cfg.block_size}: "
            "shorten them or use sample_long, which slides the context window"
        )


def sample_long(
    params: model.Params,
    prompt: list[int],
    key: jax.Array,
    *,
    cfg: ModelConfig,
    num_tokens: int,
    sc: SamplingConfig = SamplingConfig(),
) -> list[int]:
    """Sample `num_tokens` after one prompt, past the context length (nanoGPT's `sample.py` crops the same way).

    When the context is full, decoding restarts from the last half of it as the new prompt, so each token still
    sees at least block_size/2 tokens of context and the cache is recomputed once per block_size/2 tokens.
    """
    context = list(prompt)[-cfg.block_size // 2:]
    out: list[int] = []
    while len(out) < num_tokens:
        n = min(num_tokens - len(out), cfg.block_size - len(context))
        key, sub = jax.random.split(key)
        tokens_BN, _, lengths_B = generate(
            params, jnp.asarray([context], jnp.int32), jnp.asarray([len(context)], jnp.int32), sub,
            cfg=cfg, max_new_tokens=n, sc=sc,
        )
        new = [int(t) for t in np.asarray(tokens_BN[0, : int(lengths_B[0])])]
        out += new
        if sc.stop_token is not None and new and new[-1] == sc.stop_token:
            break
        context = (context + new)[-cfg.block_size // 2:]
    return out
