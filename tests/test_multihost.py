"""Multi-process training through launch.sh: two local processes of 4 CPU devices each train exactly like one
process of 8, checkpoint collectively, survive kill -9, and resume with identical losses. Plus the fast parts:
how launch.sh and llmjax.distributed read a cluster's description (local, SLURM, generic variables).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from llmjax.distributed import cluster_from_env
from llmjax.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCH = str(REPO_ROOT / "launch.sh")


# ---------------------------------------------------------------------------------------------------- fast


def test_no_cluster_variables_means_one_process() -> None:
    assert cluster_from_env({}) is None
    env = {"COORDINATOR_ADDRESS": "node7:12355", "NUM_PROCESSES": "4", "PROCESS_ID": "3"}
    assert cluster_from_env(env) == ("node7:12355", 4, 3)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NUM_PROCESSES": "2"}, "COORDINATOR_ADDRESS, PROCESS_ID is unset"),
        ({"COORDINATOR_ADDRESS": "node7", "NUM_PROCESSES": "2", "PROCESS_ID": "0"}, "is not host:port"),
        ({"COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "2", "PROCESS_ID": "2"}, r"must be in \[0, NUM_PROCESSES=2\)"),
        ({"COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "two", "PROCESS_ID": "0"}, "must be integers"),
    ],
)
def test_incomplete_or_bad_cluster_variables_are_user_errors(env: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        cluster_from_env(env)


def _fake_python(tmp_path: Path) -> dict[str, str]:
    """An environment whose `python` prints the cluster variables and XLA_FLAGS it was started with, and whose
    `scontrol` expands SLURM's node list, so launch.sh's logic is tested without starting JAX."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(
        "#!/usr/bin/env bash\n"
        'echo "$PROCESS_ID/$NUM_PROCESSES@$COORDINATOR_ADDRESS xla=[$XLA_FLAGS] args=[$*]"\n'
    )
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n[[ "$*" == "show hostnames node[01-02]" ]] && '
                                      "printf 'node01\\nnode02\\n'\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in (
        "COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID", "XLA_FLAGS")}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "PYTHON": str(bin_dir / "python")}


def test_launch_reads_slurm_variables(tmp_path: Path) -> None:
    env = {**_fake_python(tmp_path), "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "node[01-02]"}
    out = subprocess.run([LAUNCH, "experiments.gpt", "--preset=gpt2"], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "1/2@node01:12355 xla=[] args=[-m experiments.gpt --preset=gpt2]"


def test_launch_starts_local_processes_with_their_devices(tmp_path: Path) -> None:
    out = subprocess.run([LAUNCH, "--num_processes=2", "--devices_per_process=4", "experiments.gpt", "--x=1"],
                         env=_fake_python(tmp_path), capture_output=True, text=True, check=True).stdout
    lines = sorted(out.strip().splitlines())
    assert [line.split("@")[0] for line in lines] == ["0/2", "1/2"]
    assert all("localhost:" in line and "--xla_force_host_platform_device_count=4" in line for line in lines)
    assert lines[0].split("@")[1].split()[0] == lines[1].split("@")[1].split()[0]  # one coordinator


def test_launch_rejects_unknown_options(tmp_path: Path) -> None:
    proc = subprocess.run([LAUNCH, "--processes=2", "experiments.gpt"], env=_fake_python(tmp_path),
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown launcher option --processes=2" in proc.stderr


# ---------------------------------------------------------------------------------------------------- slow

# A tiny char model; warmup then a fixed decay horizon, so the schedule does not depend on --max_iters.
RUN_FLAGS = (
    "experiments.gpt", "--preset=shakespeare_char_cpu", "--n_layer=2", "--n_embd=64", "--batch_size=8",
    "--learning_rate=1e-2", "--warmup_iters=2", "--lr_decay_iters=1000", "--log_interval=1", "--eval_interval=4",
    "--eval_iters=2", "--ckpt_interval=4", "--num_samples=0", "--mesh=data:2,fsdp:2,tensor:2",
)
TWO_PROCESSES = ("--num_processes=2", "--devices_per_process=4")
REFERENCE_STEPS = 16


def _launch(launcher_flags: tuple, workdir: Path, data_cache: Path, max_iters: int) -> subprocess.Popen:
    return subprocess.Popen(
        [LAUNCH, *launcher_flags, *RUN_FLAGS, f"--workdir={workdir}", f"--data_cache={data_cache}",
         f"--max_iters={max_iters}"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def _records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_after_kill_9(tmp_path: Path) -> None:
    data_cache = tmp_path / "data"
    reference_dir, run_dir = tmp_path / "one_process", tmp_path / "two_processes"
    _finish(_launch(("--devices_per_process=8",), reference_dir, data_cache, REFERENCE_STEPS))
    reference = _losses(_records(reference_dir))
    assert sorted(reference) == list(range(1, REFERENCE_STEPS + 1))

    # Two processes, killed (the whole process group, SIGKILL) as soon as their first checkpoint is committed.
    run = _launch(TWO_PROCESSES, run_dir, data_cache, max_iters=1000)
    first_checkpoint = run_dir / "checkpoints" / "4"
    deadline = time.monotonic() + 600
    while not first_checkpoint.is_dir() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    out, _ = run.communicate()
    assert first_checkpoint.is_dir(), out[-3000:]
    killed = _losses(_records(run_dir))
    saved = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved + 4 <= REFERENCE_STEPS, f"the run got to checkpoint {saved} before it was killed"
    for step, loss in killed.items():
        np.testing.assert_allclose(loss, reference[step], rtol=1e-5, err_msg=f"step {step}")

    # Resume: the same two processes continue from the checkpoint.
    before = len(_records(run_dir))
    out = _finish(_launch(TWO_PROCESSES, run_dir, data_cache, max_iters=saved + 4))
    assert f"resuming from the checkpoint at step {saved}" in out
    after = _records(run_dir)[before:]
    resumed = _losses(after)
    assert sorted(resumed) == list(range(saved + 1, saved + 5))
    for step, loss in resumed.items():
        if step in killed:  # the killed run got this far too: the same two-process program, the same numbers
            assert loss == killed[step], step
        np.testing.assert_allclose(loss, reference[step], rtol=1e-5, err_msg=f"step {step}")

    # Only process 0 writes metrics: one record per logged step and one evaluation per eval step.
    killed_records = _records(run_dir)[:before]
    assert [r["step"] for r in killed_records if "loss" in r] == sorted(killed)
    evals = [r["step"] for r in killed_records if "val_loss" in r]
    assert evals == list(range(4, 4 * len(evals) + 1, 4)) and evals[0] == 4
    assert [r["step"] for r in after if "val_loss" in r] == [saved + 4]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iters"] == saved + 4
