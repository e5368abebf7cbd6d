"""The transformer: causality, parameter counts, an independent reference forward pass (MHA / GQA, GPT-2 / Llama),
RoPE's relative positions, and the runtime switches (scan, remat, bf16, dropout) that must not change the maths."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import model
from llmjax.config import ModelConfig, from_preset
from llmjax.errors import UserError


def tiny(preset: str, **overrides) -> ModelConfig:
    """A preset's architecture at test size (2 layers, width 16, 4 heads unless overridden)."""
    fields = dict(n_layer=2, n_head=4, n_embd=16, vocab_size=11, block_size=8)
    fields.update(overrides)
    return from_preset(preset, **fields)[0]


def noisy_params(cfg: ModelConfig, seed: int = 0) -> model.Params:
    """Random parameters of `cfg`'s shapes, with norm scales near 1 and non-zero biases so every term is exercised.

    Drawn with numpy: jitting jax.random for every shape would dominate the runtime of these small tests.
    """
    rng = np.random.default_rng(seed)

    def make(spec: model.ParamSpec) -> jax.Array:
        base, std = {"ones": (1.0, 0.1), "zeros": (0.0, 0.1)}.get(spec.init, (0.0, 0.2))
        return jnp.asarray(base + std * rng.standard_normal(spec.shape), jnp.float32)

    return jax.tree.map(make, model.param_specs(cfg), is_leaf=lambda x: isinstance(x, model.ParamSpec))


# Jitted once per config: op-by-op dispatch of the eager model is much slower than one compile.
apply = jax.jit(model.apply, static_argnames="cfg")


def random_tokens(cfg: ModelConfig, batch: int = 2, seed: int = 3) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, cfg.block_size)), jnp.int32)


# ------------------------------------------------------------------------------------------------ reference model


def ref_norm(x, p, cfg):
    if cfg.norm == "layernorm":
        x = x - x.mean(-1, keepdims=True)
        y = x / jnp.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps)
    else:
        y = x / jnp.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps)
    y = y * p["scale"]
    return y + p["bias"] if "bias" in p else y


def ref_rope(x_BTHE, theta):
    """HF Llama's rotate-half RoPE, written out independently of llmjax.model.rotary."""
    T, E = x_BTHE.shape[1], x_BTHE.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, E, 2) / E)
    angles = np.arange(T)[:, None] * inv_freq[None, :]  # [T, E/2]
    emb = np.concatenate([angles, angles], -1)[None, :, None, :]
    rotated = jnp.concatenate([-x_BTHE[..., E // 2:], x_BTHE[..., : E // 2]], -1)
    return x_BTHE * np.cos(emb) + rotated * np.sin(emb)


def ref_attention(q_BTHE, k_BSKE, v_BSKE):
    """Causal softmax attention with each K/V head repeated for its H/K query heads (the HF `repeat_kv` way)."""
    H, K, E = q_BTHE.shape[2], k_BSKE.shape[2], q_BTHE.shape[3]
    k = jnp.repeat(k_BSKE, H // K, axis=2)
    v = jnp.repeat(v_BSKE, H // K, axis=2)
    T = q_BTHE.shape[1]
    scores = jnp.einsum("bthe,bshe->bhts", q_BTHE, k) / math.sqrt(E)
    scores = jnp.where(np.tril(np.ones((T, T), bool)), scores, -jnp.inf)
    return jnp.einsum("bhts,bshe->bthe", jax.nn.softmax(scores, -1), v)


@functools.partial(jax.jit, static_argnames="cfg")
def ref_logits(params, tokens_BT, cfg: ModelConfig):
    """A plain per-head forward pass: separate Wq [D, H, E], Wk/Wv [D, K, E] unpacked from the fused w_qkv."""
    B, T = tokens_BT.shape
    H, K, E, D = cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.n_embd
    G = H // K
    x = params["wte"][tokens_BT]
    if cfg.position == "learned":
        x = x + params["wpe"][:T]
    for layer in range(cfg.n_layer):
        p = jax.tree.map(lambda a, layer=layer: a[layer], params["blocks"])
        w = p["w_qkv"]  # [D, K, G + 2, E]: query head h = k·G + g belongs to K/V head k
        b = p.get("b_qkv", jnp.zeros(w.shape[1:]))
        wq, wk, wv = w[:, :, :G].reshape(D, H, E), w[:, :, G], w[:, :, G + 1]
        bq, bk, bv = b[:, :G].reshape(H, E), b[:, G], b[:, G + 1]
        h = ref_norm(x, p["attn_norm"], cfg)
        q = jnp.einsum("btd,dhe->bthe", h, wq) + bq
        k = jnp.einsum("btd,dke->btke", h, wk) + bk
        v = jnp.einsum("btd,dke->btke", h, wv) + bv
        if cfg.position == "rope":
            q, k = ref_rope(q, cfg.rope_theta), ref_rope(k, cfg.rope_theta)
        o = ref_attention(q, k, v)
        x = x + jnp.einsum("bthe,hed->btd", o, p["w_o"]) + p.get("b_o", 0.0)
        h = ref_norm(x, p["mlp_norm"], cfg)
        if cfg.mlp == "swiglu":
            hidden = jax.nn.silu(h @ p["w_gate"]) * (h @ p["w_in"])
        else:
            hidden = jax.nn.gelu(h @ p["w_in"] + p.get("b_in", 0.0), approximate=False)  # nanoGPT's exact GELU
        x = x + hidden @ p["w_out"] + p.get("b_out", 0.0)
    x = ref_norm(x, params["final_norm"], cfg)
    return x @ (params["wte"].T if cfg.tie_embeddings else params["lm_head"])


@pytest.mark.parametrize(
    "preset,overrides",
    [
        ("gpt2", {}),  # biases, LayerNorm, GELU, learned positions, tied embeddings, MHA
        ("llama_small", {}),  # RMSNorm, SwiGLU, RoPE, untied, GQA with 2 K/V heads for 4 query heads
        ("llama_small", {"n_kv_head": 4}),  # GQA with n_kv_head == n_head is plain multi-head attention
        ("llama_small", {"n_kv_head": 1}),  # multi-query attention
    ],
)
def test_forward_matches_reference_implementation(preset, overrides):
    """The fused-QKV, grouped-einsum model computes the same logits as a textbook per-head transformer."""
    cfg = tiny(preset, **overrides)
    params = noisy_params(cfg)
    tokens = random_tokens(cfg)
    np.testing.assert_allclose(apply(params, tokens, cfg), ref_logits(params, tokens, cfg), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("K", [4, 2, 1])
def test_grouped_attention_matches_repeated_kv(K):
    """attention() with G query heads per K/V head equals attention over K/V heads repeated G times (G=1: MHA)."""
    cfg = ModelConfig(n_head=4, n_kv_head=K, n_embd=32).validate()
    B, T, H, E = 2, 5, 4, 8
    rng = np.random.default_rng(0)
    q_BTHE, k_BSKE, v_BSKE = (jnp.asarray(rng.standard_normal((B, T, n, E)), jnp.float32) for n in (H, K, K))
    out = model.attention(q_BTHE.reshape(B, T, K, H // K, E), k_BSKE, v_BSKE, None, cfg, None)
    np.testing.assert_allclose(out.reshape(B, T, H, E), ref_attention(q_BTHE, k_BSKE, v_BSKE), atol=1e-5)


# ------------------------------------------------------------------------------------------------------ causality


def dependence(cfg: ModelConfig) -> np.ndarray:
    """dep[t, s] = max |d h_t / d embedding of the token at position s|, via the Jacobian of `trunk` w.r.t. wte.

    Every position holds a different token (vocab = T), so row s of wte is exactly position s's input embedding;
    `trunk` stops before the (tied) unembedding, so wte reaches h only through the inputs.
    """
    T = cfg.block_size
    params = noisy_params(cfg)
    tokens = jnp.asarray(np.random.default_rng(5).permutation(T))[None]
    hidden_TD = lambda wte: model.trunk({**params, "wte": wte}, tokens, cfg)[0][0]
    jac = jax.jit(jax.jacrev(hidden_TD))(params["wte"])  # [T, D, V, D]
    per_token = np.abs(np.asarray(jac)).max(axis=(1, 3))  # [T, V]
    return per_token[:, np.asarray(tokens[0])]


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("preset", ["gpt2", "llama_small"])
def test_causality(preset, scan):
    """Hidden state t has exactly zero gradient w.r.t. inputs after t, and a non-zero one w.r.t. every input ≤ t."""
    cfg = tiny(preset, vocab_size=8, block_size=8, scan_layers=scan)
    dep = dependence(cfg)
    future = np.triu(np.ones_like(dep, bool), k=1)
    assert np.all(dep[future] == 0.0)
    assert np.all(dep[~future] > 1e-6)


def test_sliding_window_limits_receptive_field():
    """With a window W, each layer looks back at most W-1 positions: 2 layers see exactly t-2(W-1)..t."""
    W = 3
    dep = dependence(tiny("llama_small", vocab_size=8, block_size=8, sliding_window=W))
    t, s = np.indices(dep.shape)
    visible = (s <= t) & (s >= t - 2 * (W - 1))
    assert np.all(dep[~visible] == 0.0)
    assert np.all(dep[visible] > 1e-6)


# ------------------------------------------------------------------------------------------------ parameter counts


def count(cfg: ModelConfig) -> int:
    return model.count_params(jax.eval_shape(lambda: model.init(cfg, jax.random.key(0))))


def test_gpt2_has_124m_parameters():
    """The gpt2 preset is GPT-2 small: 124,439,808 parameters (HF's count, tied embeddings counted once)."""
    assert count(from_preset("gpt2")[0]) == 124_439_808


def test_shakespeare_char_cpu_matches_nanogpt():
    """nanoGPT's CPU Shakespeare model: 4 layers, width 128, no biases, vocab 65 -> "number of parameters: 0.80M"."""
    cfg = from_preset("shakespeare_char_cpu", vocab_size=65)[0]
    d, layers, vocab, block = 128, 4, 65, 64
    per_layer = d + 3 * d * d + d * d + d + 4 * d * d + 4 * d * d  # ln_1, c_attn, c_proj, ln_2, c_fc, mlp.c_proj
    non_embedding = layers * per_layer + vocab * d + d  # + tied wte + ln_f (nanoGPT subtracts wpe)
    assert non_embedding == 795_904 and f"{non_embedding / 1e6:.2f}M" == "0.80M"
    assert count(cfg) == non_embedding + block * d


def test_gqa_shrinks_only_the_kv_projection():
    """Going from 4 K/V heads to 1 removes exactly 2·(4-1) head-sized K and V columns per layer."""
    mha, mqa = tiny("llama_small", n_kv_head=4), tiny("llama_small", n_kv_head=1)
    assert count(mha) - count(mqa) == mha.n_layer * mha.n_embd * 2 * 3 * mha.head_dim


# ------------------------------------------------------------------------------------------------------------ RoPE


def test_rope_depends_only_on_relative_position():
    """q·k after rotating q to position m and k to n equals that at (m+c, n+c), and changes with n-m."""
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((1, 1, 16)), jnp.float32) for _ in range(2))

    def score(m: int, n: int) -> float:
        rq = model.rotary(q, jnp.array([[m]]), 10000.0)
        rk = model.rotary(k, jnp.array([[n]]), 10000.0)
        return float(jnp.sum(rq * rk))

    for m, n, c in [(3, 1, 5), (0, 7, 100), (12, 12, 37)]:
        assert score(m, n) == pytest.approx(score(m + c, n + c), abs=1e-4)
    assert abs(score(3, 1) - score(3, 2)) > 1e-3
    np.testing.assert_allclose(model.rotary(q, jnp.array([[0]]), 10000.0), q)  # position 0 is the identity


# --------------------------------------------------------------------------------------- runtime-only switches


@pytest.mark.parametrize("preset", ["gpt2", "llama_small"])
def test_scan_and_loop_give_same_logits(preset):
    """scan_layers only changes how the stacked layers are run, not the result."""
    cfg = tiny(preset, scan_layers=False)
    params = noisy_params(cfg)
    tokens = random_tokens(cfg)
    scanned = apply(params, tokens, dataclasses.replace(cfg, scan_layers=True))
    np.testing.assert_allclose(apply(params, tokens, cfg), scanned, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("remat,scan", [("full", False), ("dots", True)])
def test_remat_gives_same_loss_and_grads(remat, scan):
    """Rematerialisation recomputes activations in the backward pass; loss and gradients are unchanged."""
    base = tiny("llama_small", scan_layers=scan)
    params = noisy_params(base)
    tokens = random_tokens(base)

    def loss(p, cfg):
        return model.cross_entropy(apply(p, tokens[:, :-1], cfg), tokens[:, 1:])

    loss_and_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    loss0, grads0 = loss_and_grads(params, base)
    loss1, grads1 = loss_and_grads(params, dataclasses.replace(base, remat=remat))
    assert float(loss1) == pytest.approx(float(loss0), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads0, grads1)


def test_bfloat16_compute_is_close_to_float32():
    """compute_dtype=bfloat16 runs with float32 parameters and float32 logits, within bf16 rounding of f32."""
    cfg = tiny("llama_small")
    params = noisy_params(cfg)
    tokens = random_tokens(cfg)
    f32 = apply(params, tokens, cfg)
    bf16 = apply(params, tokens, dataclasses.replace(cfg, compute_dtype="bfloat16"))
    assert bf16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(bf16)))
    assert not np.array_equal(bf16, f32)  # it really ran in lower precision
    np.testing.assert_allclose(bf16, f32, atol=0.05)
    loss = lambda logits: float(model.cross_entropy(logits[:, :-1], tokens[:, 1:]))
    assert loss(bf16) == pytest.approx(loss(f32), rel=1e-2)


def test_dropout_is_active_only_with_a_key_and_deterministic_per_key():
    """dropout>0 changes logits when a key is given, the same key gives the same logits, no key means eval mode."""
    cfg = tiny("gpt2", dropout=0.2)
    params = noisy_params(cfg)
    tokens = random_tokens(cfg)
    no_dropout = tiny("gpt2", dropout=0.0)
    eval_logits = apply(params, tokens, cfg)
    np.testing.assert_array_equal(eval_logits, apply(params, tokens, no_dropout))
    a = apply(params, tokens, cfg, dropout_key=jax.random.key(1))
    b = apply(params, tokens, cfg, dropout_key=jax.random.key(1))
    c = apply(params, tokens, cfg, dropout_key=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, eval_logits, atol=1e-3)
    assert not np.allclose(a, c, atol=1e-3)


# ------------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "preset,overrides,named",
    [
        ("gpt2", {"n_embd": 30, "n_head": 4}, "n_embd=30"),
        ("llama_small", {"n_kv_head": 3}, "n_kv_head=3"),
        ("llama_small", {"n_embd": 12, "n_head": 4}, "RoPE"),  # odd head dim
        ("gpt2", {"norm": "batchnorm"}, "norm="),
        ("gpt2", {"dropout": 1.0}, "dropout="),
        ("gpt2", {"n_layr": 3}, "'n_layr'"),
        ("nope", {}, "'nope'"),
        ("gpt2", {"batch_size": 6, "grad_accum": 4}, "grad_accum=4"),
    ],
)
def test_invalid_configs_raise_user_error_naming_the_field(preset, overrides, named):
    """Bad configs fail at the edge with a one-line UserError that names the offending field."""
    with pytest.raises(UserError) as info:
        from_preset(preset, **overrides)
    message = str(info.value)
    assert named in message and "\n" not in message


def test_cross_entropy_of_uniform_logits_is_log_vocab_and_mask_selects_positions():
    """cross_entropy is mean NLL in nats: log V for uniform logits; the mask averages only the kept positions."""
    logits = jnp.zeros((2, 3, 7))
    targets = jnp.zeros((2, 3), jnp.int32)
    assert float(model.cross_entropy(logits, targets)) == pytest.approx(math.log(7))
    logits = logits.at[0, 0, 0].set(100.0)  # position (0, 0) is certain; masked to it alone, the loss is ~0
    mask = jnp.zeros((2, 3)).at[0, 0].set(1)
    assert float(model.cross_entropy(logits, targets, mask)) == pytest.approx(0.0, abs=1e-6)
