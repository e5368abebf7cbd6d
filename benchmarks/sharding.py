"""Throughput and per-device memory of each parallelism layout: one CPU device against 8 in several meshes.

    python benchmarks/sharding.py                                  # every layout, each in its own process
    python benchmarks/sharding.py --layout=fsdp:2,tensor:4         # one layout in this process

Prints `name value unit` lines: `tokens_per_sec_1dev`, `tokens_per_sec_8dev_<layout>`,
`param_opt_bytes_per_device_<layout>` (parameters + optimizer state actually held by the fullest device) and
`peak_bytes_per_device_<layout>` (XLA's memory analysis of the compiled step), with <layout> like
`fsdp2_tensor4`. The model is shakespeare_char_cpu with 8 heads, so every layout can split it 8 ways. On a CPU the 8
"devices" share the machine's cores: the figures show the cost of each layout's collectives, not a speed-up.
"""

import argparse
import os
import subprocess
import sys

LAYOUTS = ("data:8", "fsdp:8", "tensor:8", "data:2,fsdp:2,tensor:2", "fsdp:2,tensor:4")
MODEL = {"vocab_size": 65, "n_head": 8, "batch_size": 16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", default=None, help="one mesh (e.g. fsdp:8) or 1dev; default: all, in subprocesses")
    p.add_argument("--preset", default="shakespeare_char_cpu")
    p.add_argument("--steps", type=int, default=20, help="timed steps after warm-up")
    return p.parse_args()


def layout_name(layout: str) -> str:
    """'data:2,fsdp:2' -> '8dev_data2_fsdp2' (1dev stays 1dev), for the printed figure names."""
    return layout if layout == "1dev" else "8dev_" + layout.replace(":", "").replace(",", "_")


def sweep(args: argparse.Namespace) -> None:
    for layout in ("1dev", *LAYOUTS):
        devices = 1 if layout == "1dev" else 8
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        out = subprocess.run(
            [sys.executable, __file__, f"--layout={layout}", f"--preset={args.preset}", f"--steps={args.steps}"],
            env=env, capture_output=True, text=True, check=True,
        ).stdout
        print(out, end="", flush=True)


def measure(args: argparse.Namespace) -> None:

    import jax

    from benchmarks.timing import time_train_steps
    from llmjax import config, model, sharding, train
    from llmjax.optim import make_optimizer

    cfg, tc = config.from_preset(args.preset, **MODEL)
    if args.layout == "1dev":
        mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    else:
        mesh = sharding.make_mesh(sharding.parse_mesh(args.layout, jax.device_count()))
    trainer = train.Trainer(cfg, tc, mesh, train.lm_loss(cfg), make_optimizer(tc, model.param_axes(cfg)))
    state, seconds, _ = time_train_steps(trainer, args.steps, warmup=5)
    name = layout_name(args.layout)
    held = sharding.bytes_per_device({"params": state["params"], "opt_state": state["opt_state"]})
    print(f"tokens_per_sec_{name} {tc.batch_size * cfg.block_size / seconds:.0f} tokens/s")
    print(f"param_opt_bytes_per_device_{name} {held} bytes")
    print(f"peak_bytes_per_device_{name} {sharding.memory_report(trainer.compiled_step)['peak']} bytes")


if __name__ == "__main__":
    arguments = parse_args()
    measure(arguments) if arguments.layout else sweep(arguments)
