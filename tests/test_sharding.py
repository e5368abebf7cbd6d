"""Sharded training: every mesh layout trains like one device, parameters land where the rule table says,
FSDP divides the train state, checkpoints move between meshes, and bad layouts fail with one-line errors.

The multi-device checks run once, in a subprocess with 8 XLA CPU devices (the flag must be set before JAX is
imported): `python tests/test_sharding.py` is that worker; it prints one JSON line that the tests read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EIGHT_DEVICES = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}

# Tiny models whose heads split 8 ways (GPT-2: MHA, learned positions, biases, tied embeddings) or 4 ways
# (Llama: GQA with 4 K/V heads for 8 query heads, RoPE, SwiGLU, untied embeddings).
MODELS = {
    "gpt2": dict(vocab_size=64, block_size=16, n_layer=2, n_head=8, n_embd=64, bias=True),
    "llama": dict(vocab_size=64, block_size=16, n_layer=2, n_head=8, n_kv_head=4, n_embd=64, norm="rmsnorm",
                  mlp="swiglu", position="rope", tie_embeddings=False, mlp_hidden=128),
}
MESHES = {
    "gpt2": ("data:8", "fsdp:8", "tensor:8", "data:2,fsdp:2,tensor:2", "fsdp:2,tensor:4"),
    "llama": ("data:2,fsdp:2,tensor:2", "fsdp:2,tensor:4"),
}
STEPS = 5

# The expected PartitionSpec of every parameter, one column per mesh of MESHES["gpt2"]:
#   data:8 | fsdp:8 | tensor:8 | data:2,fsdp:2,tensor:2 | fsdp:2,tensor:4
# embed -> fsdp, heads / kv_heads / mlp / vocab -> tensor, layers and head_dim replicated.
_ = None
GOLDEN_GPT2 = {
    "wte": ((_, _), (_, "fsdp"), ("tensor", _), ("tensor", "fsdp"), ("tensor", "fsdp")),
    "wpe": ((_, _), (_, "fsdp"), (_, _), (_, "fsdp"), (_, "fsdp")),
    "final_norm.scale": ((_,), ("fsdp",), (_,), ("fsdp",), ("fsdp",)),
    "final_norm.bias": ((_,), ("fsdp",), (_,), ("fsdp",), ("fsdp",)),
    "blocks.attn_norm.scale": ((_, _), (_, "fsdp"), (_, _), (_, "fsdp"), (_, "fsdp")),
    "blocks.attn_norm.bias": ((_, _), (_, "fsdp"), (_, _), (_, "fsdp"), (_, "fsdp")),
    "blocks.w_qkv": (
        (_, _, _, _, _), (_, "fsdp", _, _, _), (_, _, "tensor", _, _), (_, "fsdp", "tensor", _, _),
        (_, "fsdp", "tensor", _, _),
    ),
    "blocks.b_qkv": ((_, _, _, _), (_, _, _, _), (_, "tensor", _, _), (_, "tensor", _, _), (_, "tensor", _, _)),
    "blocks.w_o": (
        (_, _, _, _), (_, _, _, "fsdp"), (_, "tensor", _, _), (_, "tensor", _, "fsdp"), (_, "tensor", _, "fsdp"),
    ),
    "blocks.b_o": ((_, _), (_, "fsdp"), (_, _), (_, "fsdp"), (_, "fsdp")),
    "blocks.mlp_norm.scale": ((_, _), (_, "fsdp"), (_, _), (_, "fsdp"), (_, "fsdp")),
    "blocks.mlp_norm.bias": ((_, _), (_, "fsdp"), (_, _), (_, "fsdp"), (_, "fsdp")),
    "blocks.w_in": ((_, _, _), (_, "fsdp", _), (_, _, "tensor"), (_, "fsdp", "tensor"), (_, "fsdp", "tensor")),
    "blocks.b_in": ((_, _), (_, _), (_, "tensor"), (_, "tensor"), (_, "tensor")),
    "blocks.w_out": ((_, _, _), (_, _, "fsdp"), (_, "tensor", _), (_, "tensor", "fsdp"), (_, "tensor", "fsdp")),
    "blocks.b_out": ((_, _), (_, "fsdp"), (_, _), (_, "fsdp"), (_, "fsdp")),
}
# Llama on fsdp:2,tensor:4: 4 K/V heads, each with its 2 query heads, one per tensor device.
GOLDEN_LLAMA_FSDP2_TENSOR4 = {
    "wte": ("tensor", "fsdp"),
    "lm_head": ("fsdp", "tensor"),
    "final_norm.scale": ("fsdp",),
    "blocks.attn_norm.scale": (_, "fsdp"),
    "blocks.w_qkv": (_, "fsdp", "tensor", _, _),
    "blocks.w_o": (_, "tensor", _, "fsdp"),
    "blocks.mlp_norm.scale": (_, "fsdp"),
    "blocks.w_in": (_, "fsdp", "tensor"),
    "blocks.w_gate": (_, "fsdp", "tensor"),
    "blocks.w_out": (_, "tensor", "fsdp"),
}


# ------------------------------------------------------------------------------------------------ the worker


def _worker() -> dict:
    """Runs in the 8-device subprocess: losses, shardings and bytes per mesh, and a cross-mesh resume."""
    import jax
    import optax

    from llmjax import config, model, sharding, train
    from llmjax.checkpoint import Checkpointer
    from llmjax.optim import make_optimizer

    assert jax.device_count() == 8, jax.devices()
    tc = config.TrainConfig(batch_size=8, warmup_iters=0, learning_rate=1e-2, max_iters=STEPS).validate()
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 64, (STEPS, tc.batch_size, 17)).astype(np.int32)
    batches = [{"x": w[:, :-1], "y": w[:, 1:]} for w in windows]

    def trainer_for(cfg: config.ModelConfig, mesh_spec: str | None) -> train.Trainer:
        if mesh_spec is None:
            mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
        else:
            mesh = sharding.make_mesh(sharding.parse_mesh(mesh_spec, jax.device_count()))
        return train.Trainer(cfg, tc, mesh, train.lm_loss(cfg), make_optimizer(tc, model.param_axes(cfg)))

    def train_steps(trainer: train.Trainer, state: dict, steps: range) -> tuple[dict, list[float]]:
        losses = []
        for s in steps:
            batch = trainer.put_batch(batches[s])
            if trainer.compiled_step is None:
                trainer.compile(state, batch)
            state, metrics = trainer.step(state, batch)
            losses.append(float(metrics["loss"]))  # waiting on each step: see train.run_loop
        return state, losses

    def specs(tree: dict) -> dict[str, list]:
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {".".join(k.key for k in path): list(leaf.sharding.spec) for path, leaf in flat}

    def total_bytes(tree: dict) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(tree))

    out: dict = {"losses": {}, "specs": {}, "moments_follow_params": {}, "bytes": {}}
    trainers: dict[str, train.Trainer] = {}  # each compiles its step once; the resume check below reuses them
    initial: dict[str, dict] = {}
    for name, fields in MODELS.items():
        cfg = config.ModelConfig(**fields).validate()
        # One host-built initial state for every mesh: the comparison is about the step, not the init.
        initial[name] = jax.device_get(train.new_state(cfg, make_optimizer(tc, model.param_axes(cfg)),
                                                       jax.random.key(0)))
        for mesh_spec in (None, *MESHES[name]):
            key = f"{name}/{mesh_spec or '1dev'}"
            trainer = trainers[key] = trainer_for(cfg, mesh_spec)
            state, losses = train_steps(trainer, jax.device_put(initial[name], trainer.shardings), range(STEPS))
            out["losses"][key] = losses
            out["specs"][key] = specs(state["params"])
            adam = [s for s in jax.tree.leaves(state["opt_state"], is_leaf=lambda x: hasattr(x, "mu"))
                    if isinstance(s, optax.ScaleByAdamState)][0]
            out["moments_follow_params"][key] = all(
                m.sharding == p.sharding and v.sharding == p.sharding
                for m, v, p in zip(jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu),
                                   jax.tree.leaves(state["params"]), strict=True)
            )
            train_state = {"params": state["params"], "opt_state": state["opt_state"]}
            out["bytes"][key] = [sharding.bytes_per_device(train_state), total_bytes(train_state)]

    # Save after 3 steps on data:8, then take step 4 on data:8 and, restored, on data:2,fsdp:2,tensor:2.
    saver, resumer = trainers["gpt2/data:8"], trainers["gpt2/data:2,fsdp:2,tensor:2"]
    state, _ = train_steps(saver, jax.device_put(initial["gpt2"], saver.shardings), range(3))
    with tempfile.TemporaryDirectory() as tmp, Checkpointer(tmp) as ckpt:
        ckpt.save(3, state, {})
        _, (same_mesh_loss,) = train_steps(saver, state, range(3, 4))
        restored, _ = ckpt.restore(resumer.abstract_state(), 3)
        resharded = jax.tree.leaves(jax.tree.map(lambda x, sh: x.sharding == sh, restored, resumer.shardings))
        _, (new_mesh_loss,) = train_steps(resumer, restored, range(3, 4))
    out["resume"] = {"same_mesh": same_mesh_loss, "new_mesh": new_mesh_loss, "resharded": resharded}
    return out


@pytest.fixture(scope="module")
def worker() -> dict:
    # XLA's backend optimisations halve the compile time of these tiny steps and do not matter for what is tested.
    fast_compile = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env = {**EIGHT_DEVICES, "XLA_FLAGS": f"{EIGHT_DEVICES['XLA_FLAGS']} {fast_compile}"}
    proc = subprocess.run([sys.executable, __file__], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [f"{m}/{mesh}" for m, meshes in MESHES.items() for mesh in meshes])
def test_every_mesh_trains_like_one_device(worker: dict, name: str) -> None:
    reference = worker["losses"][f"{name.split('/')[0]}/1dev"]
    losses = worker["losses"][name]
    assert len(losses) == STEPS and losses[0] != losses[-1]  # it trained
    np.testing.assert_allclose(losses, reference, rtol=1e-5)


def test_gpt2_parameter_shardings_match_the_golden_table(worker: dict) -> None:
    for column, mesh in enumerate(MESHES["gpt2"]):
        got = worker["specs"][f"gpt2/{mesh}"]
        assert set(got) == set(GOLDEN_GPT2), mesh
        for param, specs in GOLDEN_GPT2.items():
            assert got[param] == list(specs[column]), (mesh, param, got[param])


def test_llama_gqa_shardings_match_the_golden_table(worker: dict) -> None:
    got = worker["specs"]["llama/fsdp:2,tensor:4"]
    for param, spec in GOLDEN_LLAMA_FSDP2_TENSOR4.items():
        assert got[param] == list(spec), (param, got[param])


def test_optimizer_moments_take_their_parameters_sharding(worker: dict) -> None:
    assert all(worker["moments_follow_params"].values()), worker["moments_follow_params"]


def test_fsdp8_holds_an_eighth_of_params_and_optimizer_state_per_device(worker: dict) -> None:
    per_device, total = worker["bytes"]["gpt2/fsdp:8"]
    replicated_per_device, _ = worker["bytes"]["gpt2/data:8"]
    assert replicated_per_device == total
    # ≈ 1/8: only the few vectors without an embed axis (QKV and MLP-in biases) stay whole on every device.
    assert 1 / 8 <= per_device / total < 1.1 / 8, per_device / total


def test_checkpoint_resumes_onto_a_different_mesh(worker: dict) -> None:
    resume = worker["resume"]
    assert all(resume["resharded"])
    np.testing.assert_allclose(resume["new_mesh"], resume["same_mesh"], rtol=1e-6)


# ------------------------------------------------------------------------------------- in-process unit tests


def test_mesh_flag_parses_and_infers_one_axis() -> None:
    from llmjax.sharding import parse_mesh

    assert parse_mesh("data:2,fsdp:-1,tensor:2", 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert parse_mesh("fsdp:8", 8) == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("data:3", "has 3 devices but 8 are available"),
        ("data:-1,fsdp:-1", "more than one axis"),
        ("model:8", "bad mesh entry"),
        ("data:3,fsdp:-1", "not divisible by 3"),
    ],
)
def test_bad_mesh_flags_are_one_line_user_errors(spec: str, message: str) -> None:
    from llmjax.errors import UserError
    from llmjax.sharding import parse_mesh

    with pytest.raises(UserError, match=message) as info:
        parse_mesh(spec, 8)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("fields", "tensor", "message"),
    [
        (dict(n_head=4, n_kv_head=2, n_embd=64), 4, r"n_kv_head=2 does not split over tensor=4: .*\(1, 2\)"),
        (dict(n_head=25, n_embd=100), 2, r"n_head=25 does not split over tensor=2: .*\(1, 5, 25\)"),
        (dict(n_head=4, n_embd=64, mlp_hidden=130), 4, "MLP hidden width 130 does not split over tensor=4"),
    ],
)
def test_tensor_parallelism_that_does_not_divide_is_a_user_error(fields: dict, tensor: int, message: str) -> None:
    from llmjax.config import ModelConfig
    from llmjax.errors import UserError
    from llmjax.sharding import check_model_divides

    cfg = ModelConfig(**fields).validate()
    with pytest.raises(UserError, match=message) as info:
        check_model_divides(cfg, {"data": 1, "fsdp": 8 // tensor, "tensor": tensor})
    assert "\n" not in str(info.value)
    check_model_divides(cfg, {"data": 8, "fsdp": 1, "tensor": 1})  # no tensor axis: anything goes


def test_batch_that_does_not_split_over_data_and_fsdp_is_a_user_error() -> None:
    from jax.sharding import AbstractMesh

    from llmjax.errors import UserError
    from llmjax.sharding import check_batch_divides

    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    check_batch_divides(8, mesh)
    with pytest.raises(UserError, match=r"batch of 6 sequences does not split over data×fsdp=4"):
        check_batch_divides(6, mesh)


def test_vocab_that_does_not_divide_is_replicated_not_an_error() -> None:
    from jax.sharding import AbstractMesh, PartitionSpec

    from llmjax.sharding import spec_for

    mesh = AbstractMesh((1, 2, 4), ("data", "fsdp", "tensor"))
    assert spec_for(("vocab", "embed"), (50257, 1600), mesh) == PartitionSpec(None, "fsdp")
    assert spec_for(("batch", None, None), (8, 16, 64), mesh) == PartitionSpec("fsdp", None, None)


def test_constrain_is_the_identity_without_a_mesh() -> None:
    import jax.numpy as jnp

    from llmjax.sharding import constrain

    x = jnp.ones((4, 3))
    assert constrain(x, ("batch", None)) is x


# ------------------------------------------------------------------------------------- the experiment's flags


def _gpt(*flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "experiments.gpt", *flags], env=EIGHT_DEVICES, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_compile_only_fsdp_needs_under_a_quarter_of_the_unsharded_memory_and_bad_flags_fail_cleanly() -> None:
    tiny = ("--preset=shakespeare_char_cpu", "--n_layer=2", "--batch_size=16", "--compile_only")
    runs = {
        "fsdp": _gpt(*tiny, "--mesh=fsdp:8"),
        "tensor": _gpt("--preset=llama_small", "--mesh=tensor:4,data:2", "--compile_only"),
        "mesh": _gpt(*tiny, "--mesh=data:2,fsdp:2"),
        "batch": _gpt("--preset=shakespeare_char_cpu", "--mesh=fsdp:8", "--compile_only"),
    }
    out = {name: (p.wait(timeout=300), *p.communicate()) for name, p in runs.items()}

    code, stdout, stderr = out["fsdp"]
    assert code == 0, stderr[-2000:]
    figures = {line.split()[0]: float(line.split()[1]) for line in stdout.splitlines() if line.startswith("memory_")}
    assert figures["memory_peak_bytes_per_device"] < figures["memory_peak_bytes_unsharded"] / 4, figures
    assert figures["memory_argument_bytes_per_device"] < figures["memory_argument_bytes_unsharded"] / 4, figures
    expected = {
        "tensor": "error: n_kv_head=2 does not split over tensor=4",
        "mesh": "error: mesh 'data:2,fsdp:2' has 4 devices but 8 are available",
        "batch": "error: batch of 12 sequences does not split over data×fsdp=8",
    }
    for name, message in expected.items():
        code, _, stderr = out[name]
        error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert code == 2 and len(error_lines) == 1 and error_lines[0].startswith(message), (name, stderr[-2000:])


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    print(json.dumps(_worker()))
