"""MoE vs dense at equal active parameters: train-step time and the cost of routing, dispatch and combine.

    python benchmarks/moe_step.py                 # the architectures experiment's llama and moe arms, 1 device

The two arms are exactly `experiments/architectures.py`'s (4 layers, d=128, context 128, batch 16; MoE: 8 SwiGLU
experts of half the dense MLP width, top-2). Steps are timed in interleaved rounds (dense, MoE, dense, ...) and the
median round is reported, so drift in the machine's speed hits both arms alike. One layer is then timed three ways
(forward + backward): the MoE layer, the same expert matmuls on a buffer of the same shape filled by a reshape
instead of routing + gather, and the dense MLP; the first minus the second is the dispatch cost.

Prints `name value unit` lines: ms_per_step_dense, ms_per_step_moe, moe_step_ratio, layer_ms_moe,
layer_ms_experts_only, layer_ms_dense, dispatch_ms, dispatch_fraction.
"""

import argparse
import os
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=1, help="XLA CPU devices (the experiment trains on one)")
    p.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds")
    p.add_argument("--steps", type=int, default=10, help="train steps per arm per round")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--vocab_size", type=int, default=65)
    return p.parse_args()


def median_interleaved(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call of each fn, timed in rounds that visit every fn in turn."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main(args: argparse.Namespace) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"

    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.architectures import BASE, arm_config
    from llmjax import model, moe, sharding, train
    from llmjax.config import TrainConfig
    from llmjax.optim import make_optimizer

    tc = TrainConfig(batch_size=args.batch_size, max_iters=1000, learning_rate=1e-3, beta2=0.99).validate()
    mesh = sharding.make_mesh({"data": args.devices, "fsdp": 1, "tensor": 1})
    configs = {name: arm_config(name, args.vocab_size, args.block_size, BASE) for name in ("llama", "moe")}
    rng = np.random.default_rng(0)

    def stepper(cfg):  # returns a closure running `args.steps` steps and waiting on each, as train.run_loop does
        trainer = train.Trainer(cfg, tc, mesh, train.lm_loss(cfg), make_optimizer(tc, model.param_axes(cfg)))
        x = rng.integers(0, cfg.vocab_size, (tc.batch_size, cfg.block_size + 1), dtype=np.int32)
        batch = trainer.put_batch({"x": x[:, :-1], "y": x[:, 1:]})
        state = trainer.init_state()
        trainer.compile(state, batch)

        def run() -> None:
            nonlocal state
            for _ in range(args.steps):
                state, metrics = trainer.step(state, batch)
                float(metrics["loss"])

        run()  # warm-up
        return run

    step_s = median_interleaved({"dense": stepper(configs["llama"]), "moe": stepper(configs["moe"])}, args.rounds)
    dense_ms, moe_ms = (1e3 * step_s[name] / args.steps for name in ("dense", "moe"))
    print(f"ms_per_step_dense {dense_ms:.1f} ms")
    print(f"ms_per_step_moe {moe_ms:.1f} ms")
    print(f"moe_step_ratio {moe_ms / dense_ms:.2f} x")

    cfg_moe, cfg_dense = configs["moe"], configs["llama"]
    B, T, D, E = args.batch_size, args.block_size, cfg_moe.n_embd, cfg_moe.n_experts
    C = moe.capacity(T, cfg_moe)

    def layer0(cfg):
        return jax.tree.map(lambda a: a[0], model.init(cfg, jax.random.key(0))["blocks"])

    p_moe = layer0(cfg_moe)["moe"]
    p_dense = {k: v for k, v in layer0(cfg_dense).items() if k in ("w_in", "w_gate", "w_out")}
    x_BTD = jax.random.normal(jax.random.key(1), (B, T, D))

    def moe_layer(p, x_BTD):
        out_BTD, stats = moe.mixture_of_experts(x_BTD, p, cfg_moe)
        return jnp.sum(out_BTD**2) + stats["moe_aux_loss"] + stats["router_z_loss"]

    def experts_only(p, x_BTD):
        # The MoE layer's expert matmuls, in its [E, B, C, D] layout, on a buffer built by tiling and transposing:
        # no router, gather or combine.
        x_BECD = jnp.tile(x_BTD, (1, -(-E * C // T), 1))[:, : E * C].reshape(B, E, C, D)
        x_EBCD = x_BECD.transpose(1, 0, 2, 3)
        h_EBCF = jax.nn.silu(jnp.einsum("ebcd,edf->ebcf", x_EBCD, p["w_gate"]))
        h_EBCF = h_EBCF * jnp.einsum("ebcd,edf->ebcf", x_EBCD, p["w_in"])
        return jnp.sum(jnp.einsum("ebcf,efd->ebcd", h_EBCF, p["w_out"]).transpose(1, 0, 2, 3) ** 2)

    def dense_layer(p, x_BTD):
        return jnp.sum(model.mlp(x_BTD, p, cfg_dense) ** 2)

    def timed(f, p):
        g = jax.jit(jax.grad(f, argnums=(0, 1)))
        jax.block_until_ready(g(p, x_BTD))

        def run() -> None:
            for _ in range(args.steps):
                out = g(p, x_BTD)
            jax.block_until_ready(out)

        return run

    layer_s = median_interleaved(
        {
            "moe": timed(moe_layer, p_moe),
            "experts_only": timed(experts_only, p_moe),
            "dense": timed(dense_layer, p_dense),
        },
        args.rounds,
    )
    layer_ms = {name: 1e3 * s / args.steps for name, s in layer_s.items()}
    for name, ms in layer_ms.items():
        print(f"layer_ms_{name} {ms:.2f} ms")
    dispatch = layer_ms["moe"] - layer_ms["experts_only"]
    print(f"dispatch_ms {dispatch:.2f} ms")
    print(f"dispatch_fraction {100 * dispatch / layer_ms['moe']:.0f} %")


if __name__ == "__main__":
    main(parse_args())
