"""Training: the step learns, gradient accumulation is exact, the LR schedule and decay mask, bitwise resume,
divergence handling and clean stops on SIGTERM."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

from llmjax import data, model, sharding, train
from llmjax.checkpoint import Checkpointer
from llmjax.config import ModelConfig, TrainConfig, from_preset
from llmjax.errors import UserError
from llmjax.optim import decay_mask, learning_rate, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**overrides) -> tuple[ModelConfig, TrainConfig]:
    fields = dict(n_layer=1, n_head=2, n_embd=32, vocab_size=16, block_size=16, batch_size=4, eval_iters=2,
                  warmup_iters=2, weight_decay=0.0)
    return from_preset("shakespeare_char_cpu", **{**fields, **overrides})


def make_trainer(cfg: ModelConfig, tc: TrainConfig, optimizer=None) -> train.Trainer:
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    optimizer = optimizer or make_optimizer(tc, model.param_axes(cfg))
    return train.Trainer(cfg, tc, mesh, train.lm_loss(cfg), optimizer)


def random_batch(cfg: ModelConfig, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch_size, cfg.block_size + 1), np.int32)
    return {"x": tokens[:, :-1], "y": tokens[:, 1:]}


def test_overfits_one_fixed_batch():
    """A few hundred steps on one fixed batch of random tokens drive the loss from ~log V to below 0.1."""
    cfg, tc = tiny(learning_rate=1e-2, min_lr=1e-3, max_iters=300, warmup_iters=10, grad_clip=1.0)
    trainer = make_trainer(cfg, tc)
    state = trainer.init_state()
    batch = trainer.put_batch(random_batch(cfg, tc.batch_size))
    trainer.compile(state, batch)
    losses = []
    for _ in range(tc.max_iters):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(math.log(cfg.vocab_size), rel=0.1)
    assert losses[-1] < 0.1
    assert int(state["step"]) == tc.max_iters


def test_grad_accumulation_matches_one_big_batch():
    """grad_accum=2 over the same global batch gives the loss and (via SGD, update = -grad) the gradient of
    grad_accum=1, up to float rounding: micro-batch gradients are averaged, not summed."""
    cfg, tc = tiny(batch_size=8)
    batch = random_batch(cfg, 8)
    results = []
    for accum in (1, 2):
        trainer = make_trainer(cfg, dataclasses.replace(tc, grad_accum=accum), optax.sgd(1.0))
        state = trainer.init_state()
        before = jax.tree.map(np.asarray, state["params"])
        step_batch = trainer.put_batch(batch)
        assert step_batch["x"].shape == (accum, 8 // accum, cfg.block_size)
        trainer.compile(state, step_batch)
        state, metrics = trainer.step(state, step_batch)
        grads = jax.tree.map(lambda b, a: b - np.asarray(a), before, state["params"])
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]), grads))
    (loss1, norm1, grads1), (loss2, norm2, grads2) = results
    assert loss2 == pytest.approx(loss1, rel=1e-6)
    assert norm2 == pytest.approx(norm1, rel=1e-5) and norm1 > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), grads1, grads2)


def test_learning_rate_schedule():
    """nanoGPT's schedule: lr·(s+1)/(warmup+1) during warmup, the peak at warmup, cosine to min_lr, then flat."""
    tc = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110).validate()
    lr = lambda s: float(learning_rate(s, tc))
    assert lr(0) == pytest.approx(1 / 11)
    assert lr(9) == pytest.approx(10 / 11)
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.1 + 0.5 * 0.9)  # halfway through the decay: cos(π/2) = 0
    assert lr(35) == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi / 4)) * 0.9, rel=1e-5)
    assert lr(110) == pytest.approx(0.1)
    assert lr(500) == pytest.approx(0.1)
    shorter = dataclasses.replace(tc, lr_decay_iters=60)
    assert float(learning_rate(60, shorter)) == pytest.approx(0.1)


@pytest.mark.parametrize("preset", ["gpt2", "llama_small"])
def test_weight_decay_mask(preset):
    """Matrices and embeddings are decayed; norm scales and every bias are not, although stacked layers give
    them an extra leading axis (and the QKV bias has three axes of its own)."""
    cfg = from_preset(preset, n_layer=2, n_head=4, n_embd=16)[0]
    mask = decay_mask(model.param_axes(cfg))
    flat = {jax.tree_util.keystr(path): v for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = {k for k, v in flat.items() if v}
    matrices = {"['wte']", "['blocks']['w_qkv']", "['blocks']['w_o']", "['blocks']['w_in']", "['blocks']['w_out']"}
    matrices |= {"['wpe']"} if cfg.position == "learned" else {"['lm_head']", "['blocks']['w_gate']"}
    assert decayed == matrices
    if cfg.bias:
        assert {"['blocks']['b_qkv']", "['blocks']['b_o']", "['blocks']['attn_norm']['bias']"} <= set(flat) - decayed


# ---------------------------------------------------------------------------------------------- run_loop and resume


def loop(workdir, cfg: ModelConfig, tc: TrainConfig):
    """run_loop on a fixed random corpus with per-step logging; returns (state, summary)."""
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 2000).astype(np.uint16)

    def batch_fn(step: int) -> dict[str, np.ndarray]:
        x, y = data.batch_for_step(tokens, seed=tc.seed, step=step, batch_size=tc.batch_size,
                                   block_size=cfg.block_size)
        return {"x": x, "y": y}

    x, y = data.batch_for_step(tokens, seed=99, step=0, batch_size=tc.batch_size, block_size=cfg.block_size)
    meta = {"model": dataclasses.asdict(cfg), "train": dataclasses.asdict(tc)}
    return train.run_loop(make_trainer(cfg, tc), workdir=str(workdir), batch_fn=batch_fn,
                          eval_sets={"val": [{"x": x, "y": y}]}, meta=meta)


def logged_losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_resume_is_bitwise_identical(tmp_path):
    """6 steps straight equal 3 steps, a restart from the step-3 checkpoint, then 3 more (dropout on, so the
    per-step keys must line up too): same losses at every step and the same final parameters."""
    cfg, tc = tiny(dropout=0.1, log_interval=1, eval_interval=100, ckpt_interval=100, lr_decay_iters=6,
                   weight_decay=0.1)
    straight_state, _ = loop(tmp_path / "straight", cfg, dataclasses.replace(tc, max_iters=6))
    _, first = loop(tmp_path / "resumed", cfg, dataclasses.replace(tc, max_iters=3))
    assert first["iters"] == 3
    resumed_state, summary = loop(tmp_path / "resumed", cfg, dataclasses.replace(tc, max_iters=6))
    assert summary["iters"] == 6
    straight, resumed = logged_losses(tmp_path / "straight"), logged_losses(tmp_path / "resumed")
    assert sorted(straight) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert resumed == straight
    jax.tree.map(np.testing.assert_array_equal, straight_state["params"], resumed_state["params"])


def test_nan_loss_raises_and_keeps_the_last_checkpoint(tmp_path):
    """A learning rate of 1e30 makes the loss non-finite: TrainingDiverged, and the step-2 checkpoint written
    before it still restores to the parameters it had."""
    cfg, tc = tiny(max_iters=2, ckpt_interval=100, eval_interval=100)
    good_state, _ = loop(tmp_path, cfg, tc)
    good_params = jax.tree.map(np.asarray, good_state["params"])
    with pytest.raises(train.TrainingDiverged, match="loss became"):
        loop(tmp_path, cfg, dataclasses.replace(tc, max_iters=10, learning_rate=1e30))
    trainer = make_trainer(cfg, tc)
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2]
        restored, meta = ckpt.restore(trainer.abstract_state())
    assert meta["model"]["n_embd"] == cfg.n_embd
    jax.tree.map(np.testing.assert_array_equal, good_params, restored["params"])


def test_resume_rejects_a_different_architecture(tmp_path):
    """Resuming a workdir with another n_embd fails before touching the checkpoint, naming the field."""
    cfg, tc = tiny(max_iters=1)
    loop(tmp_path, cfg, tc)
    other = dataclasses.replace(cfg, n_embd=64)
    with pytest.raises(UserError, match="n_embd"):
        loop(tmp_path, other, dataclasses.replace(tc, max_iters=2))


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    """SIGTERM mid-training saves a checkpoint at the current step and exits 0; rerunning resumes from it."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"{i} bottles of beer on the wall\n" for i in range(300)))
    workdir = tmp_path / "run"
    args = [sys.executable, "-m", "experiments.gpt", f"--data=text:{corpus}", f"--data_cache={tmp_path / 'cache'}",
            f"--workdir={workdir}", "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16",
            "--batch_size=4", "--eval_iters=2", "--num_samples=1", "--sample_tokens=5", "--log_interval=1",
            "--eval_interval=100000", "--ckpt_interval=100000"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.Popen([*args, "--max_iters=1000000"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        metrics = workdir / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    with Checkpointer(workdir / "checkpoints") as ckpt:
        saved = ckpt.latest_step()
    assert saved is not None and saved >= 3
    assert f"stopped by signal {int(signal.SIGTERM)} at step {saved}" in out
    assert json.loads((workdir / "summary.json").read_text())["interrupted"] is True

    rerun = subprocess.run([*args, f"--max_iters={saved + 2}"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from the checkpoint at step {saved}" in rerun.stdout
    assert json.loads((workdir / "summary.json").read_text())["iters"] == saved + 2
