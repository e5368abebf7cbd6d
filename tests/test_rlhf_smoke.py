"""Smoke runs of the RLHF experiments (--smoke): they finish, write the stable summary keys and plots, share the
cached stages, and reject bad flags with a one-line error. Slow: each is a few tens of CPU-seconds."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

PPO_KEYS = ("rm_acc_labels", "rm_acc_true", "ref_reward", "ppo_reward", "ppo_kl", "ppo_chain_ll_drop",
            "ppo_distinct", "adaptive_kl_final")


def run(module: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *flags], capture_output=True, text=True, timeout=600)


def test_rlhf_ppo_and_dpo_smoke_share_the_cached_stages(tmp_path):
    result = run("experiments.rlhf_ppo", "--smoke", f"--workdir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in PPO_KEYS:
        assert isinstance(summary[key], float), key
    assert 0 <= summary["rm_acc_labels"] <= 1 and summary["ppo_distinct"] > 0
    assert (tmp_path / "curves.png").stat().st_size > 0
    # DPO on the same workdir reads seed 0's pretrained model, pairs and reward model from the cache (the two
    # experiments share the stages; the files are not rewritten) and builds seed 1's.
    seed0 = tmp_path / "shared" / "seed0"
    written = {p.name: p.stat().st_mtime_ns for p in seed0.glob("*.pkl")}
    assert len(written) == 3, written
    result = run("experiments.dpo", "--smoke", "--seeds=0,1", "--dpo_betas=0.1,1.0", "--ppo_kl_coefs=0.05,0.5",
                 "--ppo_true_kl_coefs=0.1", f"--workdir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in seed0.glob("*.pkl")} == written
    assert len(list((tmp_path / "shared" / "seed1").glob("*.pkl"))) == 3
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert max(summary["stage_s"][0].values()) < 1.0, summary["stage_s"]
    methods = [(p["method"], p["param"]) for p in summary["frontier"]]
    assert methods == [("dpo", 0.1), ("dpo", 1.0), ("ppo", 0.05), ("ppo", 0.5), ("ppo_true", 0.1)]
    for point in summary["frontier"]:
        assert {"method", "param", "kl", "reward", "chain_ll", "distinct"} <= point.keys()
    assert len(summary["frontier_seeds"]) == 2 and "dpo_minus_ppo_min" in summary
    assert (tmp_path / "frontier.png").stat().st_size > 0


def test_bad_flags_give_one_line_errors(tmp_path):
    result = run("experiments.dpo", "--smoke", "--dpo_betas=0.1,x", f"--workdir={tmp_path}")
    assert result.returncode == 2 and result.stderr.strip().startswith("error: --dpo_betas")
    result = run("experiments.rlhf_ppo", "--smoke", "--task=lexicon", f"--data=text:{tmp_path}/missing.txt",
                 f"--workdir={tmp_path}")
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert not os.path.exists(tmp_path / "summary.json")
