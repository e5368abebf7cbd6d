"""Training throughput of a preset on this machine: tokens/s, ms/iter, MFU and first-step compile time.

    python benchmarks/train_throughput.py --preset=shakespeare_char_cpu            # one device per core (default)
    python benchmarks/train_throughput.py --devices=1 --scan_layers=true            # one option at a time
    python benchmarks/train_throughput.py --sweep                                   # every option, in subprocesses

Prints `name value unit` lines, including `tokens_per_sec <value>` and `ms_per_iter <value>`. Batches are random
tokens built on the host each step, as in training (the host→device copy overlaps the running step).
"""

import argparse
import os
import subprocess
import sys


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="shakespeare_char_cpu")
    p.add_argument("--devices", type=int, default=os.cpu_count(), help="XLA CPU devices (data-parallel)")
    p.add_argument("--scan_layers", choices=["true", "false"], default=None, help="override the preset")
    p.add_argument("--steps", type=int, default=200, help="timed steps after warm-up")
    p.add_argument("--vocab_size", type=int, default=65)
    p.add_argument("--sweep", action="store_true", help="measure every option in its own process")
    return p.parse_args()


def sweep(args: argparse.Namespace) -> None:
    variants = {
        "1dev_unrolled": ["--devices=1", "--scan_layers=false"],
        "1dev_scan": ["--devices=1", "--scan_layers=true"],
        f"{os.cpu_count()}dev_unrolled": [f"--devices={os.cpu_count()}", "--scan_layers=false"],
        f"{os.cpu_count()}dev_scan": [f"--devices={os.cpu_count()}", "--scan_layers=true"],
    }
    for name, extra in variants.items():
        out = subprocess.run(
            [sys.executable, __file__, f"--preset={args.preset}", f"--steps={args.steps}", *extra],
            capture_output=True, text=True, check=True,
        ).stdout
        for line in out.splitlines():
            print(f"{name}/{line}")


def measure(args: argparse.Namespace) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"

    import jax

    from benchmarks.timing import time_train_steps
    from llmjax import config, flops, model, sharding, train
    from llmjax.optim import make_optimizer

    overrides = {"vocab_size": args.vocab_size}
    if args.scan_layers is not None:
        overrides["scan_layers"] = args.scan_layers == "true"
    cfg, tc = config.from_preset(args.preset, **overrides)
    mesh = sharding.make_mesh({"data": args.devices, "fsdp": 1, "tensor": 1})
    trainer = train.Trainer(cfg, tc, mesh, train.lm_loss(cfg), make_optimizer(tc, model.param_axes(cfg)))
    _, seconds, compile_s = time_train_steps(trainer, args.steps, warmup=10)
    tokens = tc.batch_size * cfg.block_size
    mfu = flops.flops_per_token(cfg) * tokens / seconds / flops.peak_flops()
    print(f"devices {jax.device_count()} count")
    print(f"scan_layers {int(cfg.scan_layers)} bool")
    print(f"compile_time_s {compile_s:.2f} s")
    print(f"ms_per_iter {1e3 * seconds:.2f} ms")
    print(f"tokens_per_sec {tokens / seconds:.0f} tokens/s")
    print(f"mfu {100 * mfu:.1f} %")


if __name__ == "__main__":
    arguments = parse_args()
    sweep(arguments) if arguments.sweep else measure(arguments)
