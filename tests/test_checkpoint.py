"""Tests for llmjax.checkpoint: round trips, retention, save policy, compatibility, corruption, kill -9, resharding."""

from __future__ import annotations

import gc
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llmjax.checkpoint import Checkpointer, check_compatible
from llmjax.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
TMP_MARKER = ".orbax-checkpoint-tmp"


def make_state(scale: float = 1.0) -> dict:
    """A small train state: params (two dtypes), an adamw state after one update, and a step counter."""
    params = {
        "wte": jnp.arange(24, dtype=jnp.float32).reshape(6, 4) * scale,
        "blocks": {"ln": jnp.full((4,), scale, jnp.bfloat16), "w": jnp.eye(4, dtype=jnp.float32) * scale},
    }
    opt = optax.adamw(1e-2)
    opt_state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return {"params": optax.apply_updates(params, updates), "opt_state": opt_state, "step": jnp.int32(7)}


def abstract_of(state: dict) -> dict:
    return jax.eval_shape(lambda: state)


def assert_trees_equal(actual: object, expected: object) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` with a hash of its content, to prove nothing was changed."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def run_python(code: str, *args: object, **env: str) -> subprocess.CompletedProcess[str]:
    """Runs `code` in a fresh interpreter (so env vars like XLA_FLAGS apply before jax is imported)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}
    argv = [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]
    return subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=120)


def test_round_trip_keeps_structure_values_and_meta(tmp_path: Path) -> None:
    state = make_state()
    meta = {"model": {"n_embd": 4, "norm": "rmsnorm", "n_kv_head": None}, "tokenizer": {"kind": "char", "vocab": "ab"}}
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(7, state, meta)
        restored, restored_meta = ckpt.restore(abstract_of(state))
    assert_trees_equal(restored, state)
    # optax states are namedtuples; restoring against the abstract target keeps their types
    assert type(restored["opt_state"][0]) is type(state["opt_state"][0])
    assert restored["opt_state"][0].mu["wte"].shape == (6, 4)
    assert restored_meta == meta


def test_keep_last_k_latest_step_and_specific_step(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, keep=2) as ckpt:
        assert ckpt.latest_step() is None
        for step in (1, 2, 3, 4):
            assert ckpt.save(step, make_state(step), {"step": step})
        assert ckpt.all_steps() == [3, 4]
        assert ckpt.latest_step() == 4
        restored, meta = ckpt.restore(abstract_of(make_state()), step=3)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["3", "4"]
    assert meta == {"step": 3}
    assert_trees_equal(restored, make_state(3))
    with Checkpointer(tmp_path) as reopened:  # a new process sees the same steps
        assert reopened.latest_step() == 4
        assert reopened.restore_meta() == {"step": 4}
        assert reopened.restore_meta(3) == {"step": 3}
        with pytest.raises(UserError, match=r"no checkpoint for step 2 .*\[3, 4\]"):
            reopened.restore(abstract_of(make_state()), step=2)


def test_empty_directory(tmp_path: Path) -> None:
    with Checkpointer(tmp_path / "fresh") as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(UserError, match="no checkpoint found in"):
            ckpt.restore_meta()
        with pytest.raises(UserError, match="no checkpoint found in"):
            ckpt.restore(abstract_of(make_state()))
    assert not (tmp_path / "fresh").exists()  # reading does not create the directory


def test_save_policy_steps_time_force_and_no_overwrite(tmp_path: Path) -> None:
    state = make_state()
    with Checkpointer(tmp_path / "every", save_interval_steps=None) as ckpt:
        assert ckpt.should_save(1) and ckpt.should_save(3)
    with Checkpointer(tmp_path / "policy", save_interval_steps=10, save_interval_seconds=60.0) as ckpt:
        now = time.monotonic()
        assert ckpt.should_save(20, now) and not ckpt.should_save(21, now)
        assert ckpt.should_save(21, now + 61.0)  # 60 s since the Checkpointer was created
        assert not ckpt.save(21, state, {})  # neither 10 steps nor 60 s have passed
        assert ckpt.latest_step() is None
        assert ckpt.save(21, state, {"v": 1}, force=True)
        assert not ckpt.should_save(22, time.monotonic() + 30.0)  # the timer restarts at each save
        assert not ckpt.save(21, make_state(2.0), {"v": 2}, force=True)  # an existing step is never overwritten
        assert ckpt.restore_meta(21) == {"v": 1}
    with pytest.raises(UserError, match="keep=0"):
        Checkpointer(tmp_path / "bad", keep=0)


def test_async_save_is_committed_by_wait(tmp_path: Path) -> None:
    state = make_state()
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        assert ckpt.save(1, state, {"a": 1})
        ckpt.wait()
        assert ckpt.all_steps() == [1]
        restored, _ = ckpt.restore(abstract_of(state))
    assert_trees_equal(restored, state)


def test_check_compatible() -> None:
    saved = {"model": {"n_embd": 128, "block_size": 64, "mlp": "gelu", "shape": [1, 2]}, "seed": 0}
    current = {"model": {"n_embd": 256, "block_size": 64, "mlp": "swiglu", "shape": (1, 2)}, "seed": 1}
    check_compatible(saved, current, ("model.block_size", "model.shape"))  # tuples compare equal to JSON lists
    with pytest.raises(UserError) as err:
        check_compatible(saved, current, ("model.block_size", "model.n_embd", "model.mlp"), directory="runs/a")
    assert str(err.value) == (
        "checkpoint in runs/a was trained with model.n_embd=128 but the current config has model.n_embd=256: "
        "use a fresh --workdir or matching flags"
    )
    with pytest.raises(
        UserError, match="^checkpoint was trained with mlp=<unset> but the current config has mlp=swiglu"
    ):
        check_compatible({}, {"mlp": "swiglu"}, ("mlp",))


def test_check_compatible_fields_added_after_the_checkpoint() -> None:
    """A checkpoint older than a config field matches when the run keeps that field's default."""
    saved = {"model": {"n_embd": 128}}
    defaults = {"model.n_experts": 0}
    check_compatible(saved, {"model": {"n_embd": 128, "n_experts": 0}}, ("model.n_experts",), defaults=defaults)
    with pytest.raises(UserError, match="model.n_experts=0 but the current config has model.n_experts=8"):
        check_compatible(saved, {"model": {"n_embd": 128, "n_experts": 8}}, ("model.n_experts",), defaults=defaults)


# A failed tensorstore read makes orbax close its event loop while sibling reads still call back into it (harmless);
# tests that fail a restore end with gc.collect() so those abandoned coroutines are reported, and ignored, right there.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["garbage_step_dir", "truncated_arrays", "garbage_meta"])
def test_corrupt_checkpoint_is_a_user_error_and_left_untouched(tmp_path: Path, damage: str) -> None:
    state = make_state()
    with Checkpointer(tmp_path, keep=2) as ckpt:
        ckpt.save(1, state, {"a": 1})
        ckpt.save(2, state, {"a": 2})
    if damage == "garbage_step_dir":
        (tmp_path / "3").mkdir()
        (tmp_path / "3" / "junk").write_text("not a checkpoint")
        bad_step = 3
    elif damage == "truncated_arrays":
        for f in (tmp_path / "2" / "state").rglob("d/*"):
            f.write_bytes(b"garbage")
        bad_step = 2
    else:
        (tmp_path / "2" / "meta" / "metadata").write_text("{not json")
        bad_step = 2
    before = snapshot(tmp_path)
    with Checkpointer(tmp_path, keep=2) as ckpt:
        assert ckpt.latest_step() == bad_step
        with pytest.raises(UserError, match=rf"checkpoint {tmp_path}/{bad_step} is unreadable .*nothing was deleted"):
            ckpt.restore(abstract_of(state))
        if damage != "truncated_arrays":  # the meta of a step with damaged arrays is still readable
            with pytest.raises(UserError, match="is unreadable"):
                ckpt.restore_meta()
        restored, meta = ckpt.restore(abstract_of(state), step=1)  # the older step still works
    assert meta == {"a": 1}
    assert_trees_equal(restored, state)
    assert snapshot(tmp_path) == before
    gc.collect()


def test_restore_into_a_different_shape_names_the_array(tmp_path: Path) -> None:
    state = make_state()
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {})
        wider = jax.eval_shape(lambda: {**state, "params": {**state["params"], "wte": jnp.zeros((6, 8))}})
        with pytest.raises(UserError, match=r"1 has params\.wte of shape \(6, 4\) but .* expects \(6, 8\)"):
            ckpt.restore(wider)


def test_directory_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "ckpt").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        Checkpointer(tmp_path / "ckpt")


KILL_CHILD = """
    import sys
    import jax, jax.numpy as jnp
    from llmjax.checkpoint import Checkpointer

    base = jax.random.normal(jax.random.key(0), (4, 1024, 1536 * 4))  # 96 MB of incompressible float32
    with Checkpointer(sys.argv[1], keep=2) as ckpt:
        start = (ckpt.latest_step() or 0) + 1
        for step in range(start, start + 1000):
            ckpt.save(step, {"a": base + step, "step": jnp.int32(step)}, {"step": step})
"""


def test_kill_9_during_save_leaves_previous_checkpoint_restorable(tmp_path: Path) -> None:
    """SIGKILL a process in the middle of writing a ~96 MB checkpoint; the last committed step must restore intact,
    and a restarted process must be able to save over the debris. Two rounds: the second resumes after the first."""
    base = jax.random.normal(jax.random.key(0), (4, 1024, 1536 * 4))
    abstract = {"a": jax.ShapeDtypeStruct(base.shape, base.dtype), "step": jax.ShapeDtypeStruct((), jnp.int32)}
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    killed_mid_save = 0
    for _ in range(2):
        committed_before = {p.name for p in tmp_path.iterdir() if p.name.isdigit()}
        child = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(KILL_CHILD), str(tmp_path)], env=env, stderr=subprocess.PIPE
        )
        try:
            deadline = time.monotonic() + 60
            while True:  # wait for a new committed step, then for the next save's tmp directory to appear
                assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
                assert time.monotonic() < deadline, "the child never started a second save"
                names = {p.name for p in tmp_path.iterdir()}
                fresh_tmp = [n for n in names if TMP_MARKER in n and n.split(".")[0] not in committed_before]
                if {n for n in names if n.isdigit()} - committed_before and fresh_tmp:
                    break
                time.sleep(0.005)
            time.sleep(0.1)  # let it get well into writing the arrays
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        assert child.returncode == -signal.SIGKILL
        leftovers = [p.name for p in tmp_path.iterdir() if TMP_MARKER in p.name]
        with Checkpointer(tmp_path, keep=2) as ckpt:
            latest = ckpt.latest_step()
            assert latest is not None
            if leftovers:  # the interrupted save is invisible: the latest step is the one before it
                killed_mid_save += 1
                assert max(int(name.split(".")[0]) for name in leftovers) == latest + 1
            restored, meta = ckpt.restore(abstract)
        assert meta == {"step": latest}
        assert int(restored["step"]) == latest
        np.testing.assert_array_equal(np.asarray(restored["a"]), np.asarray(base + latest))
    assert killed_mid_save >= 1, "no kill landed during a save; make the state bigger"


SHARDED_CHILD = """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from llmjax.checkpoint import Checkpointer

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    replicated = NamedSharding(mesh, P())
    abstract = {
        "w": jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=NamedSharding(mesh, P("data", "model"))),
        "b": jax.ShapeDtypeStruct((6,), jnp.bfloat16, sharding=replicated),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
    }
    with Checkpointer(sys.argv[1]) as ckpt:
        restored, meta = ckpt.restore(abstract)
    w = restored["w"]
    assert w.sharding == abstract["w"].sharding, w.sharding
    assert len(w.addressable_shards) == 8 and w.addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(w), np.arange(48, dtype=np.float32).reshape(8, 6))
    assert restored["b"].sharding == replicated and restored["b"].dtype == jnp.bfloat16
    assert int(restored["step"]) == 3 and meta == {"devices": 1}
    print("ok")
"""


def test_restore_onto_a_sharded_target_with_another_device_count(tmp_path: Path) -> None:
    """Save from this (single-device) process, restore in a process with 8 devices onto a 4x2 mesh."""
    state = {"w": jnp.arange(48, dtype=jnp.float32).reshape(8, 6), "b": jnp.ones((6,), jnp.bfloat16)}
    state["step"] = jnp.int32(3)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state, {"devices": jax.device_count()})
    result = run_python(SHARDED_CHILD, tmp_path, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
