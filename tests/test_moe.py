"""Mixture of experts: one expert is the dense SwiGLU, capacity drops exactly the late tokens, the balancing loss is
smallest for uniform routing, the layer stays causal, active parameters count top-k experts, an MoE model trains,
and an expert-parallel mesh trains like one device.

The multi-device check runs in a subprocess with 8 XLA CPU devices: `python tests/test_moe.py` is that worker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import model, moe, sharding, train
from llmjax.config import ModelConfig, TrainConfig, from_preset
from llmjax.errors import UserError
from llmjax.generate import SamplingConfig, generate, left_pad
from llmjax.optim import make_optimizer
from llmjax.sharding import check_model_divides, parse_mesh

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
MESHES = ("expert:8", "data:2,expert:4", "fsdp:2,expert:2,tensor:2")


def tiny(**overrides):
    fields = dict(n_layer=2, n_head=4, n_embd=16, vocab_size=11, block_size=8, n_experts=4, moe_top_k=2,
                  expert_hidden=12)
    return from_preset("llama_small", **{**fields, **overrides})[0]


def noisy_params(cfg, seed: int = 0):
    rng = np.random.default_rng(seed)

    def make(spec):
        base, std = {"ones": (1.0, 0.1), "zeros": (0.0, 0.1)}.get(spec.init, (0.0, 0.3))
        return jnp.asarray(base + std * rng.standard_normal(spec.shape), jnp.float32)

    return jax.tree.map(make, model.param_specs(cfg), is_leaf=lambda x: isinstance(x, model.ParamSpec))


apply = jax.jit(model.apply, static_argnames=("cfg", "return_aux"))


def tokens_for(cfg, batch: int = 3, seed: int = 1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, cfg.block_size)), jnp.int32)


# ------------------------------------------------------------------------------------------------------ the layer


@pytest.mark.parametrize("scan", [False, True])
def test_one_expert_top1_equals_the_dense_swiglu_mlp(scan):
    """n_experts=1, top_k=1: every token goes to the one expert with gate 1, nothing is dropped, and the logits are
    those of the dense model holding the same weights."""
    moe_cfg = tiny(n_experts=1, moe_top_k=1, expert_hidden=24, scan_layers=scan)
    dense_cfg = dataclasses.replace(moe_cfg, n_experts=0, mlp_hidden=24)
    params = noisy_params(moe_cfg)
    moe_blocks = params["blocks"]
    dense_blocks = {k: v for k, v in moe_blocks.items() if k != "moe"}
    dense_blocks.update({name: moe_blocks["moe"][name][:, 0] for name in ("w_in", "w_gate", "w_out")})
    dense_params = {**params, "blocks": dense_blocks}
    tokens = tokens_for(moe_cfg)
    logits, aux = apply(params, tokens, moe_cfg, return_aux=True)
    np.testing.assert_allclose(logits, apply(dense_params, tokens, dense_cfg), atol=1e-5, rtol=1e-5)
    assert float(aux["dropped_fraction"]) == 0.0
    np.testing.assert_array_equal(aux["expert_fraction_LE"], np.ones((2, 1)))


def test_slots_are_claimed_in_token_order_up_to_capacity():
    """Choices take their expert's next free slot in token order; a full expert drops the choice (slot = E·C)."""

    experts_TK = np.array([[0, 1], [0, 2], [0, 1], [1, 0]])
    slot_TK, token_M = moe.assign_slots(experts_TK, 3, 2)  # 3 experts × 2 slots; rows e·2 + c; 6 = dropped
    np.testing.assert_array_equal(slot_TK, [[0, 2], [1, 4], [6, 3], [6, 6]])
    np.testing.assert_array_equal(token_M, [0, 1, 0, 2, 1, 4])  # 4 = T: expert 2's second slot stays empty


def test_tokens_over_capacity_are_dropped_and_counted():
    """A router that sends every token to expert 0 (top-1): the first C = ceil(cf·T/E) tokens get expert 0's
    SwiGLU output, the rest get zero, and dropped_fraction = (T − C)/T."""


    cfg = tiny(n_experts=4, moe_top_k=1, capacity_factor=1.0, block_size=16)
    rng = np.random.default_rng(0)
    D, F, E, T = cfg.n_embd, cfg.expert_dim, cfg.n_experts, 16
    p = {name: jnp.asarray(rng.standard_normal(shape), jnp.float32)
         for name, shape in (("w_in", (E, D, F)), ("w_gate", (E, D, F)), ("w_out", (E, F, D)))}
    p["w_router"] = jnp.zeros((D, E)).at[0, 0].set(10.0)
    x_BTD = jnp.asarray(rng.standard_normal((2, T, D)), jnp.float32).at[:, :, 0].set(1.0)  # expert 0 wins
    out_BTD, stats = moe.mixture_of_experts(x_BTD, p, cfg)
    C = moe.capacity(T, cfg)
    assert C == 4
    expert0 = (jax.nn.silu(x_BTD @ p["w_gate"][0]) * (x_BTD @ p["w_in"][0])) @ p["w_out"][0]
    np.testing.assert_allclose(out_BTD[:, :C], expert0[:, :C], atol=1e-4, rtol=1e-5)
    np.testing.assert_array_equal(out_BTD[:, C:], 0.0)
    assert float(stats["dropped_fraction"]) == pytest.approx((T - C) / T)
    np.testing.assert_allclose(stats["expert_fraction_E"], [1.0, 0.0, 0.0, 0.0])
    dropless, _ = moe.mixture_of_experts(x_BTD, p, cfg, dropless=True)  # decoding: room for every token
    np.testing.assert_allclose(dropless, expert0, atol=1e-4, rtol=1e-5)


def test_load_balancing_loss_is_smallest_at_uniform_routing():
    """E·Σ f·P is 1 when f = P is uniform, above 1 for any other routing with f = P, and grows as routing skews."""

    E = 8
    uniform = np.full(E, 1 / E)
    assert float(moe.load_balancing_loss(uniform, uniform)) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    for p in rng.dirichlet(np.ones(E), size=20):
        assert float(moe.load_balancing_loss(p, p)) > 1.0
    skewed = np.eye(E)[0]
    path = [float(moe.load_balancing_loss(r, r)) for r in (a * skewed + (1 - a) * uniform for a in (0, 0.25, 0.5, 1))]
    assert path == sorted(path) and path[-1] == pytest.approx(E)


@pytest.mark.slow
def test_moe_layer_is_causal_even_when_tokens_are_dropped():
    """Slots go to tokens in order, so the hidden state at t has zero gradient w.r.t. every later input, also with
    a capacity small enough that tokens are dropped."""


    cfg = tiny(capacity_factor=0.5, vocab_size=8, block_size=8)
    params = noisy_params(cfg)
    tokens = jax.numpy.asarray(np.random.default_rng(5).permutation(8))[None]
    _, aux = apply(params, tokens, cfg, return_aux=True)
    assert float(aux["dropped_fraction"]) > 0.2
    hidden_TD = lambda wte: model.trunk({**params, "wte": wte}, tokens, cfg)[0][0]
    jac = np.abs(np.asarray(jax.jit(jax.jacrev(hidden_TD))(params["wte"]))).max(axis=(1, 3))
    dep = jac[:, np.asarray(tokens[0])]
    assert np.all(dep[np.triu(np.ones_like(dep, bool), k=1)] == 0.0)
    assert np.all(np.diag(dep) > 1e-6)


def test_active_params_count_top_k_of_the_routed_experts():
    """Active = total − (E − K)/E of the routed expert weights; shared experts and the router always count."""


    cfg = tiny(n_experts=8, moe_top_k=2, expert_hidden=12, n_shared_experts=1)
    shapes = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
    routed = cfg.n_layer * 8 * 3 * cfg.n_embd * 12
    assert model.count_active_params(shapes, cfg) == model.count_params(shapes) - routed * 6 // 8
    dense = dataclasses.replace(cfg, n_experts=0, n_shared_experts=0, mlp_hidden=24)
    dense_shapes = jax.eval_shape(lambda: model.init(dense, jax.random.key(0)))
    assert model.count_active_params(dense_shapes, dense) == model.count_params(dense_shapes)
    # top-2 of 8 experts of width 12 plus a shared one of 12: the dense width-36 MLP's count + the routers
    active = model.count_active_params(shapes, cfg)
    dense36 = dataclasses.replace(dense, mlp_hidden=36)
    n36 = model.count_params(jax.eval_shape(lambda: model.init(dense36, jax.random.key(0))))
    assert active == n36 + cfg.n_layer * cfg.n_embd * 8


def test_dense_model_aux_is_zero():
    cfg = from_preset("llama_small", n_layer=2, n_head=4, n_embd=16, vocab_size=11, block_size=8)[0]
    _, aux = apply(noisy_params(cfg), tokens_for(cfg), cfg, return_aux=True)
    assert float(aux["moe_aux_loss"]) == 0.0 and float(aux["dropped_fraction"]) == 0.0
    assert aux["expert_fraction_LE"].shape == (2, 0)


@pytest.mark.slow
def test_moe_cached_decoding_equals_full_recompute():
    """Decoding is dropless; with a capacity that drops nothing in training either, cached greedy decoding of a
    MoE model with shared experts picks the tokens an uncached decode picks."""


    cfg = tiny(capacity_factor=2.0, n_shared_experts=1, block_size=16, vocab_size=13)  # C = T
    params = noisy_params(cfg)
    prompts = [[5, 1, 7], [2, 9, 4, 4, 8], [6]]
    prompt_BP, lens_B = left_pad(prompts)
    tokens, _, _ = generate(params, jnp.asarray(prompt_BP), jnp.asarray(lens_B), jax.random.key(0), cfg=cfg,
                            max_new_tokens=8, sc=SamplingConfig(temperature=0.0))
    for row, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(8):
            buf = np.zeros((1, cfg.block_size), np.int32)
            buf[0, : len(seq)] = seq
            seq.append(int(jnp.argmax(apply(params, jnp.asarray(buf), cfg)[0, len(seq) - 1])))
        assert np.asarray(tokens[row]).tolist() == seq[len(prompt):], row


# ------------------------------------------------------------------------------------------------- training


def test_aux_losses_reach_the_router_gradient_not_the_loss_value():
    """lm_loss's value is the cross-entropy; the balancing and z-losses change only the router's gradient (the
    experts' gradients do not depend on them), and the aux metrics are reported."""


    cfg = tiny(n_layer=1)
    params = noisy_params(cfg)
    tokens = np.asarray(tokens_for(cfg))
    batch = {"x": tokens, "y": np.roll(tokens, -1, axis=1)}
    no_aux = dataclasses.replace(cfg, moe_aux_coef=0.0, router_z_coef=0.0)
    loss_and_grad = jax.jit(lambda p, c: jax.value_and_grad(train.lm_loss(c), has_aux=True)(p, batch, None),
                            static_argnums=1)
    (loss, metrics), grads = loss_and_grad(params, cfg)
    (loss_without, _), grads_without = loss_and_grad(params, no_aux)
    assert not np.allclose(grads["blocks"]["moe"]["w_router"], grads_without["blocks"]["moe"]["w_router"], atol=1e-7)
    np.testing.assert_allclose(grads["blocks"]["moe"]["w_in"], grads_without["blocks"]["moe"]["w_in"], rtol=1e-5)
    logits = apply(params, jnp.asarray(batch["x"]), cfg)
    assert float(loss) == pytest.approx(float(loss_without)) == pytest.approx(
        float(model.cross_entropy(logits, jnp.asarray(batch["y"]))), rel=1e-6)
    assert set(metrics) == {"moe_aux_loss", "router_z_loss", "dropped_fraction"}
    assert float(metrics["moe_aux_loss"]) >= 1.0 and float(metrics["router_z_loss"]) > 0.0


# ------------------------------------------------------------------------------------------ expert parallelism


def _worker() -> dict:
    """Runs in the 8-device subprocess: losses and expert-weight shardings per mesh."""


    assert jax.device_count() == 8, jax.devices()
    cfg = ModelConfig(
        vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32, norm="rmsnorm", mlp="swiglu", position="rope",
        tie_embeddings=False, n_experts=8, moe_top_k=2, expert_hidden=32, n_shared_experts=1,
    ).validate()
    tc = TrainConfig(batch_size=8, warmup_iters=0, learning_rate=1e-2, max_iters=STEPS).validate()
    rng = np.random.default_rng(0)
    window = rng.integers(0, 64, (tc.batch_size, 17)).astype(np.int32)  # one fixed batch: the loss must fall
    initial = jax.device_get(train.new_state(cfg, make_optimizer(tc, model.param_axes(cfg)), jax.random.key(0)))
    out: dict = {"losses": {}, "specs": {}, "batch_slice": {}}
    for mesh_spec in (None, *MESHES):
        if mesh_spec is None:
            mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
        else:
            mesh = sharding.make_mesh(sharding.parse_mesh(mesh_spec, 8))
        trainer = train.Trainer(cfg, tc, mesh, train.lm_loss(cfg), make_optimizer(tc, model.param_axes(cfg)))
        state = jax.device_put(initial, trainer.shardings)
        losses = []
        for _ in range(STEPS):
            batch = trainer.put_batch({"x": window[:, :-1], "y": window[:, 1:]})
            if trainer.compiled_step is None:
                trainer.compile(state, batch)
            state, metrics = trainer.step(state, batch)
            losses.append(float(metrics["loss"]))  # waiting on each step: see train.run_loop
        key = mesh_spec or "1dev"
        out["losses"][key] = losses
        out["specs"][key] = {name: list(state["params"]["blocks"]["moe"][name].sharding.spec)
                             for name in ("w_in", "w_out", "w_router")}
        out["batch_slice"][key] = list(sharding.process_batch_slice(mesh))
    return out


@pytest.fixture(scope="module")
def worker() -> dict:
    fast_compile = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {fast_compile}"}
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", MESHES)
def test_expert_parallel_meshes_train_like_one_device(worker, mesh):
    """A MoE model (8 experts, top-2, a shared expert) trains on one device and every expert-parallel layout takes
    the same steps."""
    losses, reference = worker["losses"][mesh], worker["losses"]["1dev"]
    assert reference[-1] < reference[0] - 0.1
    np.testing.assert_allclose(losses, reference, rtol=1e-5)


def test_expert_weights_are_split_over_the_expert_axis(worker):
    _ = None
    assert worker["specs"]["expert:8"] == {"w_in": [_, "expert", _, _], "w_out": [_, "expert", _, _],
                                           "w_router": [_, _, _]}
    assert worker["specs"]["fsdp:2,expert:2,tensor:2"] == {
        "w_in": [_, "expert", "fsdp", "tensor"], "w_out": [_, "expert", "tensor", "fsdp"],
        "w_router": [_, "fsdp", _],
    }
    assert worker["batch_slice"]["data:2,expert:4"] == [0, 1]  # one process feeds the whole batch


def test_mesh_flag_accepts_an_expert_axis_and_checks_it_divides_the_experts():
    assert parse_mesh("data:2,expert:4", 8) == {"data": 2, "fsdp": 1, "tensor": 1, "expert": 4}
    assert parse_mesh("data:8", 8) == {"data": 8, "fsdp": 1, "tensor": 1}  # dense layouts read as before
    with pytest.raises(UserError, match="n_experts=6 does not split over expert=4"):
        check_model_divides(tiny(n_experts=6), {"expert": 4})


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (dict(mlp="gelu"), "--mlp=swiglu"),
        (dict(moe_top_k=5), "moe_top_k=5"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(n_experts=-1), "n_experts"),
    ],
)
def test_bad_moe_configs_are_one_line_user_errors(overrides, named):
    with pytest.raises(UserError) as info:
        tiny(**overrides)
    assert named in str(info.value) and "\n" not in str(info.value)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    print(json.dumps(_worker()))
