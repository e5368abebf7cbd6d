"""`python -m experiments.gpt` end to end: train writes summary.json, sample mode reads the checkpoint back, bad
input is one `error:` line on stderr with a non-zero exit and nothing in the workdir touched."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=4", "--eval_iters=2",
        "--num_samples=1", "--sample_tokens=20"]
ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
SUMMARY_KEYS = {"train_loss", "val_loss", "iters", "params", "tokens_per_sec", "mfu", "wall_time_s", "compile_time_s"}


def gpt(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | (ONE_DEVICE if env is None else env)
    return subprocess.run([sys.executable, "-m", "experiments.gpt", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    path = root / "corpus.txt"
    path.write_text("".join(f"{i} bottles of beer on the wall, take {i % 7} down\n" for i in range(400)))
    return root, [f"--data=text:{path}", f"--data_cache={root / 'cache'}"]


@pytest.fixture(scope="module")
def trained(corpus):
    """One tiny 20-step training run shared by the tests that read or must not damage its workdir."""
    root, data_flags = corpus
    workdir = root / "run"
    result = gpt(*data_flags, *TINY, f"--workdir={workdir}", "--max_iters=20")
    assert result.returncode == 0, result.stderr
    return workdir, data_flags, result


def snapshot(directory) -> dict[str, int]:
    """Every file under `directory` with its size and modification time."""
    return {
        os.path.relpath(os.path.join(d, f), directory): (os.stat(os.path.join(d, f)).st_mtime_ns,
                                                         os.stat(os.path.join(d, f)).st_size)
        for d, _, files in os.walk(directory) for f in files
    }


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, no traceback, and exactly one stderr line -- the last -- starting with "error:"."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.stderr
    for needle in needles:
        assert needle in lines[-1]


def test_train_writes_summary_and_samples(trained):
    """A 20-step run logs, evaluates, checkpoints, prints a sample and writes the documented summary keys."""
    workdir, _, result = trained
    summary = json.loads((workdir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["iters"] == 20 and summary["params"] > 0
    assert all(math.isfinite(summary[k]) and summary[k] > 0 for k in SUMMARY_KEYS)
    vocab = json.loads((workdir / "config.json").read_text())["model"]["vocab_size"]
    assert summary["train_loss"] < math.log(vocab)  # it learned something beyond uniform guessing
    assert "--- sample 1 ---" in result.stdout
    assert (workdir / "checkpoints" / "20").is_dir() and (workdir / "tokenizer").is_dir()
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 20


def test_sample_mode_prints_a_sample_from_the_checkpoint(trained):
    """--mode=sample restores the latest checkpoint and tokenizer and prints text, writing nothing."""
    workdir, _, _ = trained
    before = snapshot(workdir)
    result = gpt("--mode=sample", f"--workdir={workdir}", "--num_samples=1", "--sample_tokens=30", "--prompt=1")
    assert result.returncode == 0, result.stderr
    sample = result.stdout.split("--- sample 1 ---\n", 1)[1]
    assert sample.startswith("1") and len(sample.rstrip("\n")) >= 2
    assert snapshot(workdir) == before


@pytest.mark.parametrize(
    "flags,needles",
    [
        (["--n_embd=30", "--n_head=4"], ["n_embd=30", "n_head=4"]),
        (["--data=text:/nonexistent/corpus.txt"], ["/nonexistent"]),
        (["--preset=nope"], ["'nope'"]),
        (["--n_embd=64"], ["n_embd"]),  # resuming the trained workdir with another width
        (["--max_iters=abc"], ["--max_iters"]),
    ],
)
def test_bad_input_is_one_error_line_and_touches_nothing(trained, flags, needles):
    """Each bad input fails before doing work: `error: ...` on stderr, exit 2, the workdir unchanged."""
    workdir, data_flags, _ = trained
    before = snapshot(workdir)
    result = gpt(*data_flags, *TINY, f"--workdir={workdir}", "--max_iters=40", *flags)
    assert_user_error(result, *needles)
    assert snapshot(workdir) == before


@pytest.mark.slow
def test_data_parallel_over_two_devices(corpus, tmp_path):
    """The default CPU setup (one XLA device per core) splits the batch over 2 devices and trains."""
    _, data_flags = corpus
    result = gpt(*data_flags, *TINY, f"--workdir={tmp_path}", "--max_iters=5", "--sample_tokens=5",
                 env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert result.returncode == 0, result.stderr
    assert "mesh {'data': 2, 'fsdp': 1, 'expert': 1, 'tensor': 1}" in result.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["iters"] == 5 and math.isfinite(summary["val_loss"])
