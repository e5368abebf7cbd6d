"""LoRA: a fresh adapter is a no-op, merging equals the low-rank path, the base stays frozen, adapters save alone."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import lora, model, train
from llmjax.config import ModelConfig, TrainConfig
from llmjax.errors import UserError
from llmjax.optim import make_optimizer

CFG = ModelConfig(
    vocab_size=32,
    block_size=16,
    n_layer=2,
    n_head=4,
    n_kv_head=2,
    n_embd=32,
    norm="rmsnorm",
    mlp="swiglu",
    position="rope",
).validate()
TOKENS = jax.random.randint(jax.random.key(9), (2, 16), 0, 32)
ADAPTER_KEY = jax.random.key(1, impl="rbg")  # RBG keys: random init compiles several times faster than threefry
apply = jax.jit(model.apply, static_argnums=2)  # one compile instead of one per op in eager mode
merge = jax.jit(lora.merge, static_argnums=2)


def base_params() -> model.Params:
    return jax.jit(model.init, static_argnums=0)(CFG, jax.random.key(0, impl="rbg"))  # compiles faster


def random_adapters(params: model.Params, lcfg: lora.LoRAConfig) -> lora.Adapters:
    """Adapters with non-zero B, as after some training."""
    adapters = lora.init_adapters(params, CFG, lcfg, ADAPTER_KEY)
    rng = np.random.default_rng(0)
    return {
        n: {"a": ad["a"], "b": jnp.asarray(0.05 * rng.standard_normal(ad["b"].shape), jnp.float32)}
        for n, ad in adapters.items()
    }


@pytest.mark.parametrize("targets", ["all", "qv", "o,down"])
def test_zero_initialised_b_leaves_logits_unchanged(targets: str) -> None:
    params = base_params()
    lcfg = lora.LoRAConfig(rank=4, alpha=8.0, targets=targets).validate()
    adapters = lora.init_adapters(params, CFG, lcfg, ADAPTER_KEY)
    assert all(float(jnp.abs(ad["a"]).max()) > 0 and not jnp.any(ad["b"]) for ad in adapters.values())
    logits = apply(merge(params, adapters, lcfg), TOKENS, CFG)
    np.testing.assert_array_equal(logits, apply(params, TOKENS, CFG))
    # ... whereas a trained (non-zero) B does change them.
    trained = apply(merge(params, random_adapters(params, lcfg), lcfg), TOKENS, CFG)
    assert float(jnp.abs(trained - logits).max()) > 1e-3


def test_merged_weights_equal_the_low_rank_path() -> None:
    """x·(W + s·A·B) == x·W + s·(x·A)·B for every adapted projection, on real activations of layer 0."""
    params = base_params()
    lcfg = lora.LoRAConfig(rank=4, alpha=8.0, targets="all").validate()
    adapters = random_adapters(params, lcfg)
    merged = merge(params, adapters, lcfg)
    x_BTD = model.normalize(params["wte"][TOKENS], jax.tree.map(lambda a: a[0], params["blocks"]["attn_norm"]), CFG)
    G = CFG.n_head // CFG.kv_heads
    slots = {"q": slice(0, G), "k": G, "v": G + 1}

    def low_rank(name: str, x: jax.Array, n_in: int) -> jax.Array:
        xa = model.linear(x, adapters[name]["a"][0], CFG, n_contract=n_in)
        return lcfg.scale * model.linear(xa, adapters[name]["b"][0], CFG)

    qkv_merged = model.linear(x_BTD, merged["blocks"]["w_qkv"][0], CFG)
    qkv_base = model.linear(x_BTD, params["blocks"]["w_qkv"][0], CFG)
    for name, slot in slots.items():
        np.testing.assert_allclose(
            qkv_merged[..., slot, :], qkv_base[..., slot, :] + low_rank(name, x_BTD, 1), rtol=1e-5, atol=1e-6
        )
    for name, weight, n_in in (("up", "w_in", 1), ("gate", "w_gate", 1)):
        got = model.linear(x_BTD, merged["blocks"][weight][0], CFG)
        want = model.linear(x_BTD, params["blocks"][weight][0], CFG) + low_rank(name, x_BTD, n_in)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    h_BTHE = qkv_base[..., :G, :].reshape(2, 16, CFG.n_head, CFG.head_dim)
    np.testing.assert_allclose(
        model.linear(h_BTHE, merged["blocks"]["w_o"][0], CFG, n_contract=2),
        model.linear(h_BTHE, params["blocks"]["w_o"][0], CFG, n_contract=2) + low_rank("o", h_BTHE, 2),
        rtol=1e-5,
        atol=1e-6,
    )
    h_BTF = jax.random.normal(jax.random.key(3), (2, 16, CFG.hidden_dim))
    np.testing.assert_allclose(
        model.linear(h_BTF, merged["blocks"]["w_out"][0], CFG),
        model.linear(h_BTF, params["blocks"]["w_out"][0], CFG) + low_rank("down", h_BTF, 1),
        rtol=1e-5,
        atol=1e-6,
    )
    # Merged once for inference, the model gives the logits of the training path (merge inside the jitted loss).
    loss_fn = jax.jit(lora.lm_loss(params, CFG, lcfg))
    batch = {"x": TOKENS, "y": jnp.roll(TOKENS, -1, axis=1)}
    want = model.cross_entropy(apply(merged, TOKENS, CFG), batch["y"])
    np.testing.assert_allclose(loss_fn(adapters, batch, jax.random.key(0))[0], want, rtol=1e-6)


def test_frozen_weights_receive_no_updates() -> None:
    params = base_params()
    before = jax.tree.map(np.asarray, params)
    lcfg = lora.LoRAConfig(rank=2, alpha=4.0, targets="qv").validate()
    adapters = lora.init_adapters(params, CFG, lcfg, ADAPTER_KEY)
    tc = TrainConfig(batch_size=2, max_iters=5, warmup_iters=0, learning_rate=1e-2)
    optimizer = make_optimizer(tc, lora.adapter_axes(CFG, lcfg))
    state = lora.new_state(adapters, optimizer)
    # Optimizer moments exist for the adapters only: two per adapter array.
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
    assert len(moments) == 2 * len(jax.tree.leaves(adapters))

    @jax.jit
    def step(state: dict, base: model.Params, batch: dict) -> tuple[dict, dict]:
        return train.make_train_step(lora.lm_loss(base, CFG, lcfg), optimizer)(state, batch, jax.random.key(0))

    batch = {"x": TOKENS[None], "y": jnp.roll(TOKENS, -1, axis=1)[None]}
    losses = []
    for _ in range(5):
        state, metrics = step(state, params, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, params, before)
    assert float(jnp.abs(state["params"]["q"]["b"]).max()) > 0
    merged = merge(params, state["params"], lcfg)
    G = CFG.n_head // CFG.kv_heads
    qkv, base_qkv = merged["blocks"]["w_qkv"], params["blocks"]["w_qkv"]
    np.testing.assert_array_equal(qkv[..., G, :], base_qkv[..., G, :])  # the key slot is not a target
    assert not np.array_equal(qkv[..., :G, :], base_qkv[..., :G, :])
    assert not np.array_equal(qkv[..., G + 1, :], base_qkv[..., G + 1, :])
    untouched = {k: v for k, v in merged["blocks"].items() if k != "w_qkv"}
    jax.tree.map(np.testing.assert_array_equal, untouched, {k: before["blocks"][k] for k in untouched})
    np.testing.assert_array_equal(merged["wte"], before["wte"])


def test_trainable_fraction_counts_only_adapters() -> None:
    params = base_params()
    lcfg = lora.LoRAConfig(rank=4, targets="qv").validate()
    adapters = lora.init_adapters(params, CFG, lcfg, ADAPTER_KEY)
    D, L, r = CFG.n_embd, CFG.n_layer, 4
    q_out, v_out = CFG.n_head * CFG.head_dim, CFG.kv_heads * CFG.head_dim
    n = L * (D * r + r * q_out + D * r + r * v_out)
    assert lora.trainable_fraction(params, adapters) == pytest.approx(n / model.count_params(params))


def test_save_load_round_trip(tmp_path) -> None:
    params = base_params()
    lcfg = lora.LoRAConfig(rank=3, alpha=5.0, targets="q,v,down").validate()
    adapters = random_adapters(params, lcfg)
    path = tmp_path / "adapters.npz"
    lora.save_adapters(path, adapters, lcfg)
    loaded, loaded_cfg = lora.load_adapters(path, CFG)
    assert loaded_cfg == lcfg
    jax.tree.map(np.testing.assert_array_equal, loaded, adapters)


def test_mismatched_adapters_raise_user_error(tmp_path) -> None:
    params = base_params()
    lcfg = lora.LoRAConfig(rank=2, targets="all").validate()
    path = tmp_path / "adapters.npz"
    lora.save_adapters(path, lora.init_adapters(params, CFG, lcfg, ADAPTER_KEY), lcfg)
    wider = dataclasses.replace(CFG, n_embd=64).validate()
    with pytest.raises(UserError, match="do not fit this model"):
        lora.load_adapters(path, wider)
    gelu = dataclasses.replace(CFG, mlp="gelu").validate()  # has no gate projection
    with pytest.raises(UserError, match="do not fit this model"):
        lora.load_adapters(path, gelu)
    with pytest.raises(UserError, match="no adapter file"):
        lora.load_adapters(tmp_path / "missing.npz", CFG)
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    with pytest.raises(UserError, match="not an adapter file"):
        lora.load_adapters(tmp_path / "junk.npz", CFG)
    with pytest.raises(UserError, match="params have"):
        lora.init_adapters(params, wider, lcfg, ADAPTER_KEY)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), "rank"),
        (dict(alpha=0.0), "alpha"),
        (dict(targets="q,x"), "targets"),
        (dict(targets="q,q"), "targets"),
        (dict(targets=""), "targets"),
    ],
)
def test_bad_lora_config_raises_user_error(kwargs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        lora.LoRAConfig(**kwargs).validate()


def test_explicit_target_missing_from_model_raises() -> None:
    gelu = dataclasses.replace(CFG, mlp="gelu").validate()
    with pytest.raises(UserError, match="gate"):
        lora.adapter_shapes(gelu, lora.LoRAConfig(targets="gate").validate())
    assert "gate" not in lora.adapter_shapes(gelu, lora.LoRAConfig(targets="all").validate())
