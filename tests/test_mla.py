"""Multi-head latent attention: the absorbed computation equals explicit per-head keys and values, cached decoding
equals full recompute, and the cache holds only the latent and the RoPE key (exact bytes per token for MHA, GQA,
MQA and MLA)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_decoding import random_params, recompute_greedy

from llmjax import model
from llmjax.config import from_preset
from llmjax.errors import UserError
from llmjax.generate import SamplingConfig, generate, left_pad

PROMPTS = [[5, 1, 7], [2, 9, 4, 4, 8, 3, 1], [6]]
N_NEW = 10


def tiny(**overrides):
    fields = dict(n_layer=2, n_head=4, n_kv_head=None, n_embd=32, vocab_size=29, block_size=24, mla_kv_rank=12,
                  mla_rope_dim=4)
    return from_preset("llama_small", **{**fields, **overrides})[0]


def cached_greedy(params, cfg, prompts=PROMPTS, n=N_NEW):
    prompt_BP, lens_B = left_pad(prompts)
    tokens, _, _ = generate(params, jnp.asarray(prompt_BP), jnp.asarray(lens_B), jax.random.key(0), cfg=cfg,
                            max_new_tokens=n, sc=SamplingConfig(temperature=0.0))
    return np.asarray(tokens)


def test_absorbed_latent_attention_equals_explicit_per_head_keys_and_values():
    """Forming k = c·W_uk ⊕ k_rope and v = c·W_uv for every head, then plain causal attention, gives the same output."""
    cfg = tiny()
    p = jax.tree.map(lambda a: a[0], random_params(cfg)["blocks"])
    B, T, H, E, C, R = 2, 6, cfg.n_head, cfg.head_dim, cfg.mla_kv_rank, cfg.mla_rope_dim
    h_BTD = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, cfg.n_embd)), jnp.float32)
    positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    ctx = model.Context(positions_BT, None, None)
    o_BTHE, _ = jax.jit(lambda p, h: model.latent_attention(h, p, None, None, ctx, cfg))(p, h_BTD)

    @jax.jit
    def explicit(p, h_BTD):
        q = jnp.einsum("btd,dhx->bthx", h_BTD, p["w_q"])
        q = jnp.concatenate([q[..., :E], model.rotary(q[..., E:], positions_BT, cfg.rope_theta)], -1)
        ckv = h_BTD @ p["w_dkv"]
        c = model.normalize(ckv[..., :C], p["kv_norm"], cfg)
        k_rope = model.rotary(ckv[..., C:], positions_BT, cfg.rope_theta)
        k = jnp.concatenate([jnp.einsum("btc,che->bthe", c, p["w_uk"]),
                             jnp.broadcast_to(k_rope[:, :, None], (B, T, H, R))], -1)
        v = jnp.einsum("btc,che->bthe", c, p["w_uv"])
        scores = jnp.einsum("bthx,bshx->bhts", q, k) / math.sqrt(E + R)
        scores = jnp.where(np.tril(np.ones((T, T), bool)), scores, -jnp.inf)
        return jnp.einsum("bhts,bshe->bthe", jax.nn.softmax(scores, -1), v)

    expected = explicit(p, h_BTD)
    np.testing.assert_allclose(o_BTHE, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("overrides", [dict(scan_layers=False), dict(scan_layers=True, mla_q_rank=8)])
def test_mla_cached_greedy_equals_full_recompute(overrides):
    """Batched, left-padded decoding from the latent cache picks the tokens an uncached decode picks."""
    cfg = tiny(**overrides)
    params = random_params(cfg)
    tokens = cached_greedy(params, cfg)
    for row, prompt in enumerate(PROMPTS):
        assert tokens[row].tolist() == recompute_greedy(params, prompt, N_NEW, cfg), f"row {row}"


def test_mla_cache_holds_the_latent_and_the_rope_key_only():
    cache = model.init_cache(tiny(), batch_size=3, length=20)
    assert {name: c.shape for name, c in cache.items()} == {"c_kv": (2, 3, 20, 12), "k_rope": (2, 3, 20, 4)}


def test_kv_cache_bytes_per_token_exact_ratios():
    """At the probe size (4 layers, width 128, 4 heads, float32): MHA 4096 B/token; GQA with 2 K/V heads exactly ½,
    MQA ¼; MLA with a rank-32 latent and a 16-dim RoPE key 4·48·4 = 768 B (5.3× less than MHA). Each matches the
    bytes `init_cache` allocates per slot."""
    base = dict(n_layer=4, n_head=4, n_embd=128, vocab_size=65, block_size=128)
    mha = from_preset("llama_small", **base, n_kv_head=4)[0]
    gqa = from_preset("llama_small", **base, n_kv_head=2)[0]
    mqa = from_preset("llama_small", **base, n_kv_head=1)[0]
    mla = from_preset("llama_small", **base, n_kv_head=None, mla_kv_rank=32, mla_rope_dim=16)[0]
    per_token = {name: model.kv_cache_bytes_per_token(c) for name, c in
                 (("mha", mha), ("gqa", gqa), ("mqa", mqa), ("mla", mla))}
    assert per_token == {"mha": 2 * 4 * 4 * 32 * 4, "gqa": 2048, "mqa": 1024, "mla": 768}
    assert per_token["gqa"] / per_token["mha"] == 0.5 and per_token["mqa"] / per_token["mha"] == 0.25
    assert per_token["mha"] / per_token["mla"] >= 4
    for c in (mha, gqa, mqa, mla):
        cache = jax.eval_shape(lambda c=c: model.init_cache(c, batch_size=1, length=1))
        assert sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)) == model.kv_cache_bytes_per_token(c)
    bf16 = from_preset("llama_small", **base, compute_dtype="bfloat16")[0]
    assert model.kv_cache_bytes_per_token(bf16) == 2 * 4 * 2 * 32 * 2


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_mla_is_causal(scan):
    """The hidden state at t has zero gradient w.r.t. later inputs, and a non-zero one w.r.t. every earlier one."""
    cfg = tiny(vocab_size=8, block_size=8, scan_layers=scan)
    params = random_params(cfg)
    tokens = jnp.asarray(np.random.default_rng(5).permutation(8))[None]
    hidden_TD = lambda wte: model.trunk({**params, "wte": wte}, tokens, cfg)[0][0]
    jac = np.abs(np.asarray(jax.jit(jax.jacrev(hidden_TD))(params["wte"]))).max(axis=(1, 3))
    dep = jac[:, np.asarray(tokens[0])]
    future = np.triu(np.ones_like(dep, bool), k=1)
    assert np.all(dep[future] == 0.0) and np.all(dep[~future] > 1e-6)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (dict(position="learned"), "--position=rope"),
        (dict(mla_rope_dim=3), "mla_rope_dim=3"),
        (dict(n_kv_head=2), "n_kv_head=2"),
        (dict(attention="pallas"), "attention=pallas"),
        (dict(mla_kv_rank=-1), "mla_kv_rank"),
    ],
)
def test_bad_mla_configs_are_one_line_user_errors(overrides, named):
    with pytest.raises(UserError) as info:
        tiny(**overrides)
    assert named in str(info.value) and "\n" not in str(info.value)
