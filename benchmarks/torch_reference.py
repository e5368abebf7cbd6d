"""The same training step in PyTorch, for a side-by-side speed reference on the machine at hand.

nanoGPT's model at the `shakespeare_char_cpu` config (4 layers, 4 heads, width 128, context 64, batch 12, no biases,
tied embeddings, exact GELU, causal SDPA), with its AdamW (decay on ≥2-D tensors), β2 = 0.99 and clipping at 1.0.
A VM's speed drifts by tens of percent over a day, so compare against `train_throughput.py` run right before or after:

    pip install torch==2.13.0   # not a dependency of llmjax
    python benchmarks/torch_reference.py && python benchmarks/train_throughput.py

With --data it trains `max_iters` steps on llmjax's own batches (same crops, same schedule) and evaluates on the
same fixed batches as `experiments/gpt.py`, so its val loss is directly comparable with that run's summary.json:

    python benchmarks/torch_reference.py --data=tinyshakespeare --seed=1

Prints `ms_per_iter <value>` (the mean over the timed steps, as `train_throughput.py`) and `tokens_per_sec`.
"""

import argparse
import sys
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--steps", type=int, default=200, help="timed steps after 10 warm-up steps")
    p.add_argument("--data", default=None, help="train on this llmjax data source instead of timing random tokens")
    p.add_argument("--seed", type=int, default=1337, help="batch and eval seeds, as experiments/gpt.py --seed")
    return p.parse_args()


def main(args: argparse.Namespace) -> None:
    try:
        import torch
        import torch.nn.functional as F
        from torch import nn
    except ImportError:
        sys.exit("torch is not installed: `pip install torch==2.13.0` to run this reference (llmjax does not need it)")

    n_layer, d, n_head, t, b, v = 4, 128, 4, 64, 12, 65
    if args.data:
        from llmjax import config, data

        dataset = data.prepare_data(args.data)
        _, tc = config.from_preset("shakespeare_char_cpu", seed=args.seed)
        v = dataset.tokenizer.vocab_size
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
            self.c_attn, self.c_proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
            self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            q, k, w = (y.view(b, t, n_head, d // n_head).transpose(1, 2) for y in self.c_attn(self.ln_1(x)).split(d, 2))
            y = F.scaled_dot_product_attention(q, k, w, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + self.c_proj(y)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.wpe = nn.Embedding(v, d), nn.Embedding(t, d)
            self.blocks = nn.ModuleList(Block() for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(d, bias=False)

        def forward(self, idx: "torch.Tensor", targets: "torch.Tensor") -> "torch.Tensor":
            x = self.wte(idx) + self.wpe(torch.arange(t))
            for block in self.blocks:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.T
            return F.cross_entropy(logits.reshape(-1, v), targets.reshape(-1))

    gpt = GPT()
    for name, p in gpt.named_parameters():  # nanoGPT's init: N(0, 0.02), residual projections / sqrt(2·n_layer)
        if p.dim() == 2:
            residual = name.endswith(("c_proj.weight", "mlp_proj.weight"))
            torch.nn.init.normal_(p, mean=0.0, std=0.02 / (2 * n_layer) ** 0.5 if residual else 0.02)
    groups = [
        {"params": [p for p in gpt.parameters() if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in gpt.parameters() if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))

    def step_on(x: "torch.Tensor", y: "torch.Tensor") -> float:
        loss = gpt(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def step() -> float:
        tokens = torch.randint(0, v, (b, t + 1))
        return step_on(tokens[:, :-1], tokens[:, 1:])

    if args.data:
        train_and_evaluate(gpt, optimizer, step_on, dataset, tc, b, t)
        return
    for _ in range(10):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    print(f"torch_threads {torch.get_num_threads()} count")
    print(f"ms_per_iter {1e3 * seconds:.2f} ms")
    print(f"tokens_per_sec {b * t / seconds:.0f} tokens/s")


def train_and_evaluate(gpt, optimizer, step_on, dataset, tc, b: int, t: int) -> None:
    """nanoGPT's loop on llmjax's batches: the same train crops per step, the same lr schedule, the same eval set."""
    import numpy as np
    import torch

    from llmjax import data, optim

    for it in range(tc.max_iters):
        for group in optimizer.param_groups:
            group["lr"] = float(optim.learning_rate(it, tc))
        x, y = data.batch_for_step(dataset.train_tokens, seed=tc.seed, step=it, batch_size=b, block_size=t)
        loss = step_on(torch.from_numpy(x).long(), torch.from_numpy(y).long())
        if it % 250 == 0:
            print(f"iter {it}: loss {loss:.4f}")
    with torch.no_grad():
        for split, tokens in (("train", dataset.train_tokens), ("val", dataset.val_tokens)):
            losses = []
            for i in range(tc.eval_iters):
                x, y = data.batch_for_step(tokens, seed=tc.seed + 1, step=i, batch_size=b, block_size=t)
                losses.append(gpt(torch.from_numpy(x).long(), torch.from_numpy(y).long()).item())
            print(f"{split}_loss {np.mean(losses):.4f} nats")


if __name__ == "__main__":
    main(parse_args())
