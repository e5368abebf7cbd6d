"""End to end: `experiments/architectures.py --smoke` writes every arm's stable keys, and a rerun reuses its cache."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARMS = (
    "gpt2",
    "llama",
    "gqa",
    "mqa",
    "window",
    "moe",
    "mla",
    "bytes_pretrain",
    "ft_none",
    "ft_full",
    "ft_scratch",
    "lora_all_r4",
    "lora_all_r16",
    "lora_qv_r16",
)
STABLE_KEYS = ("val_loss", "params", "active_params", "trainable_params", "kv_bytes_per_token", "ms_per_step")


def smoke(workdir: Path, cache: Path) -> tuple[str, float]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.architectures", "--smoke", f"--workdir={workdir}", f"--data_cache={cache}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, time.perf_counter() - start


@pytest.mark.slow
def test_smoke_run_writes_every_arm_and_resumes_from_its_cache(tmp_path: Path) -> None:
    out, elapsed = smoke(tmp_path / "run", tmp_path / "data")
    print(f"architectures --smoke: {elapsed:.0f}s wall")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    arms = summary["arms"]
    assert set(arms) == set(ARMS)
    for name, arm in arms.items():
        assert all(k in arm for k in STABLE_KEYS), name
        assert len(arm["val_loss_per_seed"]) == 2 and math.isfinite(arm["val_loss"]), name
        assert arm["val_loss"] < math.log(256) + 0.5, name  # trained or not, near or below uniform
    assert arms["ft_none"]["ms_per_step"] is None
    # Parameter and cache accounting.
    assert abs(arms["llama"]["params"] / arms["gpt2"]["params"] - 1) < 0.01  # equal-parameter blocks
    assert arms["gqa"]["kv_bytes_per_token"] * 2 == arms["llama"]["kv_bytes_per_token"]
    assert arms["mqa"]["kv_bytes_per_token"] * 4 == arms["llama"]["kv_bytes_per_token"]
    assert arms["mla"]["kv_bytes_per_token"] < arms["llama"]["kv_bytes_per_token"] / 4
    assert arms["moe"]["active_params"] < arms["moe"]["params"]
    assert abs(arms["moe"]["active_params"] / arms["llama"]["active_params"] - 1) < 0.05  # equal active params
    assert 0 <= arms["moe"]["dropped_fraction"] <= 1 and arms["moe"]["expert_fraction_max"] <= 1
    trainable = {a: arms[a]["trainable_params"] for a in ("ft_none", "lora_qv_r16", "lora_all_r4", "lora_all_r16")}
    assert trainable["ft_none"] == 0 < trainable["lora_all_r4"] < trainable["lora_all_r16"]
    assert trainable["lora_qv_r16"] < trainable["lora_all_r16"] < arms["ft_full"]["trainable_params"]
    assert arms["ft_full"]["trainable_params"] == arms["ft_full"]["params"]
    # Twenty steps of full fine-tuning already fit the new corpus better than none.
    assert arms["ft_full"]["val_loss"] < arms["ft_none"]["val_loss"]
    assert {
        "llama_beats_gpt2",
        "gqa_vs_mha",
        "mqa_vs_mha",
        "moe_vs_dense",
        "window_vs_full",
        "mla_vs_mha",
        "lora_all_r4_gap_closed",
    } <= set(summary["checks"])
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    assert "lora_qv_r16" in out and "check llama_beats_gpt2" in out  # the printed table

    # A rerun trains nothing: every arm and seed comes from the cache, with the same numbers.
    out2, _ = smoke(tmp_path / "run", tmp_path / "data")
    assert "training 20 steps" not in out2 and "fine-tuning 20 steps" not in out2 and "cached" in out2
    again = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert again["arms"] == summary["arms"]


def test_bad_flags_exit_with_one_line_error(tmp_path: Path) -> None:
    cases = (
        ("--arms=llama,nope", "unknown arm"),
        ("--data=text:/nonexistent/tiny.txt", "does not exist"),
        ("--moe_capacity_factor=0", "--moe_capacity_factor=0.0 must be > 0"),
    )
    for flag, needle in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "experiments.architectures", f"--workdir={tmp_path}", flag],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2, (flag, proc.stdout, proc.stderr)
        assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (flag, proc.stderr)
