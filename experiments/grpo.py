"""GRPO with verifiable rewards (Shao et al. 2024, DeepSeekMath; DeepSeek-R1 2025) at CPU scale.

    python -m experiments.grpo                                 # addition: SFT → GRPO, Dr. GRPO, RFT baseline
    python -m experiments.grpo --loss=dr_grpo --norft          # only the Dr. GRPO arm
    python -m experiments.grpo --task=countdown --loss=grpo --norft --sft_stop_acc=0.25 --sft_max_steps=1000 \
        --sft_eval_every=5 --iters=100000 --arm_minutes=4 --eval_every=50      # Countdown, GRPO for 4 minutes
    python -m experiments.grpo --sft_stop_acc=0.02 --loss=grpo --norft --iters=200   # failure mode: too weak a start
    python -m experiments.grpo --small                         # CI smoke test (< 1 min)

A small transformer (3 layers, width 128) is trained with supervised fine-tuning on reference answers of training
problems and stopped on purpose once its greedy accuracy on 256 training problems reaches --sft_stop_acc (a
deliberately weak start). From that one checkpoint, each arm of --loss (grpo / dr_grpo / dapo) runs RL with the same
prompts, seeds and budget; --rft adds rejection-sampling fine-tuning (sample G per prompt, keep the correct ones,
NLL on them) that runs until it has sampled as many response tokens as the first RL arm: a compute-matched baseline
at equal sampled tokens. Held-out problems (--n_heldout, a fixed split disjoint from every training prompt) measure
greedy accuracy, pass@1 at temperature 1 and pass@8 before and after.

Defaults (chosen on training reward and greedy accuracy on training problems, seed 0): β = 0 (no KL term, no
reference forward pass), 32 prompts × G = 8 per iteration, lr 3e-4 after 40 warmup iterations, cosine to 3e-5 at
1600 iterations, one update per rollout batch; the train step sees only the rows of groups with unequal rewards
(--row_bucket: the others carry no gradient at β = 0, so the update is unchanged). Half the batch of the 64-prompt
recipe costs about half as much per iteration and, run side by side for equal wall time, ends with a higher
training reward (0.85 vs 0.80 over the last 30 s, seed 0); 16 prompts × 8 and 32 prompts × G = 16 learn slower per
second. Each prompt is run once per group, in sampling and in the train step (a KV cache its G responses attend
to), which makes an iteration about twice as cheap as running all 256 rows in full; each train-step shape then
costs ~6 s to compile, so --row_bucket=64 (4 shapes). The iteration count fits SFT + the GRPO arm in 5 minutes on
2 CPU cores with about a minute to spare (211–243 s for seed 0, as the VM drifts).

Writes to --workdir: metrics.jsonl and tensorboard/ (per iteration, keys prefixed by arm), curves.png (held-out
greedy accuracy and pass@1 at T=1 every --eval_every iterations, training reward and KL to the SFT policy against
iteration, accuracy against sampled tokens), config.json and summary.json with keys
    sft_greedy_acc, sft_pass1, sft_pass8     the SFT start on held-out problems
    {arm}_greedy_acc, {arm}_pass1, {arm}_pass8   after each arm (arm: grpo, dr_grpo, dapo, rft; null if not run);
                                               the stable keys are grpo_greedy_acc, grpo_pass1, grpo_pass8,
                                               dr_grpo_greedy_acc, rft_greedy_acc
    {arm}_sampled_tokens, {arm}_iters        response tokens sampled and iterations done by the arm
    {arm}_kl_final                           k3 KL to the SFT policy per response token, mean over the last 10
                                             iterations (those that logged it: every --kl_every-th at beta=0)
    {arm}_zero_var_frac_start                fraction of groups with zero reward variance, first 10 iterations
    {arm}_len_incorrect_start, _end          mean length of incorrect responses, first and last 10 iterations
    {arm}_len_incorrect_excess_start, _end   the same for their length minus the reference answer's
    {arm}_len_correct_start, _end            the same for correct ones
    {arm}_len_incorrect_paired_change, _se, _problems   per problem, its wrong answers' mean length in the last
                                             quarter of the iterations minus in the first quarter, averaged over
                                             the problems wrong in both (with its standard error and their count)
    {arm}_time_s                             the arm's wall time, evaluations included
    sft_steps, sft_time_s                    SFT steps taken before the stop, and its wall time
    wall_time_s                              the whole run
    cpu_time_s                               CPU seconds of this process (all threads): on 2 idle cores about
                                             2 × wall_time_s at most; far less means the run waited for the CPU
"""

import dataclasses
import json
import math
import os
import time

import jax
import numpy as np
from absl import app, flags

from llmjax import model
from llmjax.config import ModelConfig, TrainConfig
from llmjax.errors import UserError, absl_main
from llmjax.metrics import MetricsWriter, console
from llmjax.optim import make_optimizer
from llmjax.rl import grpo, tasks
from llmjax.rl.rollout import add_micro_axis, aggregation_weights, nll_loss, pad_prompts, pad_responses, response_mask
from llmjax.train import make_train_step

FLAGS = flags.FLAGS
flags.DEFINE_enum("task", "addition", ["addition", "countdown"], "verifiable task")
flags.DEFINE_string("workdir", "runs/grpo", "outputs")
flags.DEFINE_integer("seed", 0, "model init, SFT batches, RL prompts and sampling")
flags.DEFINE_list("loss", ["grpo", "dr_grpo"], "RL arms, each from the same SFT start: grpo, dr_grpo, dapo")
flags.DEFINE_bool("rft", True, "also run the rejection-sampling fine-tuning baseline at matched sampled tokens")
flags.DEFINE_bool("small", False, "CI smoke test: tiny budgets everywhere (< 1 min); numbers are meaningless")
# model
flags.DEFINE_integer("n_layer", 3, "transformer layers")
flags.DEFINE_integer("n_embd", 128, "model width")
flags.DEFINE_integer("n_head", 4, "attention heads")
# SFT
flags.DEFINE_float("sft_stop_acc", 0.40, "stop SFT once greedy accuracy on 256 training problems reaches this")
flags.DEFINE_integer("sft_max_steps", 3000, "SFT step limit")
flags.DEFINE_integer("sft_batch", 64, "SFT sequences per step")
flags.DEFINE_float("sft_lr", 1e-3, "SFT learning rate (constant after 20 warmup steps)")
flags.DEFINE_integer("sft_eval_every", 2, "SFT steps between checks of the stop accuracy once within 0.1 of it "
                     "(5x that before): it rises fast")
# RL
flags.DEFINE_integer("iters", 1600, "RL iterations (rollout batches) per arm")
flags.DEFINE_float("arm_minutes", None, "also stop each RL arm after this many minutes, its evaluations included")
flags.DEFINE_integer("prompts_per_iter", 32, "prompts per rollout batch")
flags.DEFINE_integer("group_size", 8, "completions per prompt (G)")
flags.DEFINE_float("lr", 3e-4, "RL learning rate after --warmup_iters")
flags.DEFINE_float("min_lr", 3e-5, "cosine-decay the RL learning rate to this at --iters (--min_lr=--lr: constant)")
flags.DEFINE_integer("warmup_iters", 40, "RL warmup: a fresh Adam's first full-size step wrecks the policy")
flags.DEFINE_float("beta", 0.0, "k3 KL coefficient (0 drops the KL term and the reference forward pass)")
flags.DEFINE_float("eps_low", 0.2, "lower clip range of the ratio")
flags.DEFINE_float("eps_high", 0.2, "upper clip range (DAPO: 0.28)")
flags.DEFINE_string("scale_rewards", None, "group | batch | none (default: none for dr_grpo, group otherwise)")
flags.DEFINE_integer("num_updates", 1, "optimizer steps per rollout batch (GRPO's μ)")
flags.DEFINE_float("temperature", 1.0, "rollout temperature")
flags.DEFINE_integer("row_bucket", 64, "train only on rows that carry gradient (groups with unequal rewards), "
                     "padded to a multiple of this many rows (0: train on every row; same update, more compute)")
flags.DEFINE_integer("kl_every", 10, "at beta=0, log KL to the SFT policy every this many iterations (it costs a "
                     "reference forward pass; with beta > 0 it is computed every iteration)")
# evaluation
flags.DEFINE_integer("n_heldout", 500, "held-out problems (fixed split, never trained on)")
flags.DEFINE_integer("eval_every", 200, "RL iterations between held-out greedy evaluations for the curves")
flags.DEFINE_integer("curve_problems", 200, "held-out problems in each curve point")

# Shapes shared with the evaluation chunks (32 prompts × G), so the smoke run compiles as few programs as possible.
SMALL = dict(n_layer=1, n_embd=32, sft_max_steps=20, sft_eval_every=10, iters=3, warmup_iters=1, n_heldout=64,
             prompts_per_iter=32, curve_problems=32, eval_every=3)


def sft(cfg: ModelConfig, train_problems: list, dev_problems: list, task: tasks.Task, key: jax.Array) -> tuple:
    """Supervised fine-tuning from scratch on reference answers, stopped at --sft_stop_acc: (params, steps)."""
    tc = TrainConfig(learning_rate=FLAGS.sft_lr, min_lr=FLAGS.sft_lr, warmup_iters=20, weight_decay=0.0,
                     max_iters=FLAGS.sft_max_steps, seed=FLAGS.seed).validate()
    optimizer = make_optimizer(tc, model.param_axes(cfg))
    step_fn = jax.jit(make_train_step(nll_loss(cfg), optimizer), donate_argnums=0)
    state = grpo.new_state(model.init(cfg, key), optimizer)
    pairs = tasks.sft_pairs(train_problems)
    prompt_XP, lens_X = pad_prompts([p for p, _ in pairs], task.prompt_len, tasks.PAD)
    tokens_XN, resp_lens_X = pad_responses([r for _, r in pairs], task.max_new_tokens, tasks.PAD)
    acc = {"greedy_acc": 0.0}
    for step in range(FLAGS.sft_max_steps):
        # Each check is a 256-row greedy decode, about as costly as a step: check 5x less often while far below.
        every = FLAGS.sft_eval_every * (1 if acc["greedy_acc"] >= FLAGS.sft_stop_acc - 0.1 else 5)
        if step % every == 0:
            acc = grpo.evaluate(state["params"], dev_problems, task, key, cfg=cfg, chunk=256, sampled=False)
            if acc["greedy_acc"] >= FLAGS.sft_stop_acc:
                console(f"sft: stop at step {step}, greedy accuracy {acc['greedy_acc']:.3f} on training problems")
                return state["params"], step
            if step % 100 == 0:
                console(f"sft step {step}: greedy accuracy {acc['greedy_acc']:.3f} on training problems")
        idx = np.random.default_rng([FLAGS.seed, step]).choice(len(pairs), FLAGS.sft_batch, replace=False)
        mask_BN = response_mask(resp_lens_X[idx], task.max_new_tokens)
        batch = {"prompt_BP": prompt_XP[idx], "prompt_lens_B": lens_X[idx], "tokens_BN": tokens_XN[idx],
                 "weight_BN": aggregation_weights(mask_BN, "token_mean")}
        state, _ = step_fn(state, add_micro_axis(batch), key)
    console(f"sft: reached --sft_max_steps={FLAGS.sft_max_steps} below the stop accuracy")
    return state["params"], FLAGS.sft_max_steps


def window_mean(history: list[dict], key: str, first: bool) -> float | None:
    """Mean of `key` over the first or last 10 iterations (NaN entries, e.g. no incorrect samples, skipped)."""
    values = [h[key] for h in (history[:10] if first else history[-10:]) if key in h and math.isfinite(h[key])]
    return float(np.mean(values)) if values else None


def plot(curves: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for arm, history in curves.items():
        points = [h for h in history if "heldout_greedy_acc" in h]
        line = axes[0].plot([h["iter"] for h in points], [h["heldout_greedy_acc"] for h in points], "o-", label=arm)
        axes[0].plot([h["iter"] for h in points], [h["heldout_pass1"] for h in points], "x--",
                     color=line[0].get_color(), label=f"{arm} pass@1 (T=1)")
        axes[1].plot([h["iter"] for h in history], [h["reward"] for h in history], label=arm, alpha=0.7)
        axes[2].plot([h["iter"] for h in history if "kl" in h], [h["kl"] for h in history if "kl" in h], label=arm)
        axes[3].plot([h["sampled_tokens"] for h in points], [h["heldout_greedy_acc"] for h in points], "o-",
                     label=arm)
    axes[0].set(xlabel="iteration", ylabel="held-out accuracy", title="greedy accuracy and pass@1")
    axes[1].set(xlabel="iteration", ylabel="mean reward of the rollouts", title="training reward (T=1)")
    axes[2].set(xlabel="iteration", ylabel="k3 KL to SFT policy (nats/token)", title="KL")
    axes[3].set(xlabel="sampled response tokens", ylabel="held-out greedy accuracy", title="accuracy vs compute")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run() -> dict:
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    if FLAGS.small:
        for name, value in SMALL.items():
            setattr(FLAGS, name, value)
    for arm in FLAGS.loss:
        if arm not in ("grpo", "dr_grpo", "dapo"):
            raise UserError(f"--loss={arm!r}: choose among grpo, dr_grpo, dapo (comma-separated)")
    # Checked before SFT so a bad value costs nothing (grpo.train checks its own arguments again).
    for name, least in (("eval_every", 1), ("kl_every", 1), ("row_bucket", 0)):
        if getattr(FLAGS, name) < least:
            raise UserError(f"--{name}={getattr(FLAGS, name)} must be ≥ {least}")
    task = tasks.make_task(FLAGS.task)
    train_problems, heldout = task.split(FLAGS.n_heldout)
    cfg = ModelConfig(vocab_size=tasks.VOCAB_SIZE, block_size=task.prompt_len + task.max_new_tokens,
                      n_layer=FLAGS.n_layer, n_head=FLAGS.n_head, n_embd=FLAGS.n_embd).validate()
    arms = [*FLAGS.loss, *(["rft"] if FLAGS.rft else [])]
    gcs = {arm: grpo.GRPOConfig(
        group_size=FLAGS.group_size, prompts_per_iter=FLAGS.prompts_per_iter, temperature=FLAGS.temperature,
        beta=FLAGS.beta, eps_low=FLAGS.eps_low, eps_high=FLAGS.eps_high, loss=arm, scale_rewards=FLAGS.scale_rewards,
        num_updates=FLAGS.num_updates).validate() for arm in arms}
    # The schedule counts optimizer steps: μ per iteration.
    tc = TrainConfig(learning_rate=FLAGS.lr, min_lr=FLAGS.min_lr, warmup_iters=FLAGS.warmup_iters, weight_decay=0.0,
                     max_iters=FLAGS.iters * FLAGS.num_updates, seed=FLAGS.seed).validate()
    os.makedirs(FLAGS.workdir, exist_ok=True)
    with open(os.path.join(FLAGS.workdir, "config.json"), "w") as f:
        json.dump({"model": dataclasses.asdict(cfg), "rl": {a: dataclasses.asdict(g) for a, g in gcs.items()},
                   "flags": FLAGS.flag_values_dict()}, f, indent=2, default=str)
    console(f"{task.name}: {len(train_problems)} train / {len(heldout)} held-out problems, "
            f"{model.count_params(jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))):,} parameters")

    key = jax.random.key(FLAGS.seed)
    sft_params, sft_steps = sft(cfg, train_problems, train_problems[:256], task, jax.random.fold_in(key, 0))
    eval_key = jax.random.fold_in(key, 1)  # the same sampling noise for every evaluation
    start = grpo.evaluate(sft_params, heldout, task, eval_key, cfg=cfg, n_samples=FLAGS.group_size)
    console(f"sft ({sft_steps} steps) on held-out: " + json.dumps(start))
    summary: dict = {"sft_greedy_acc": start["greedy_acc"], "sft_pass1": start["pass1"], "sft_pass8": start["pass_n"],
                     "sft_steps": sft_steps, "sft_time_s": time.perf_counter() - wall_start}

    writer = MetricsWriter(FLAGS.workdir)
    curve_problems = heldout[: FLAGS.curve_problems]
    curves: dict[str, list[dict]] = {}
    budget = None
    for arm in ["grpo", "dr_grpo", "dapo", "rft"]:
        for suffix in ("greedy_acc", "pass1", "pass8"):
            summary[f"{arm}_{suffix}"] = None
    for arm in arms:
        arm_start = time.perf_counter()

        rows_by_iter: list[dict[str, np.ndarray]] = []

        def on_iter(it: int, params: model.Params, record: dict, rows: dict, arm: str = arm,
                    rows_by_iter: list = rows_by_iter) -> None:
            rows_by_iter.append(rows)
            if it % FLAGS.eval_every == 0 or it == 1:
                point = grpo.evaluate(params, curve_problems, task, eval_key, cfg=cfg, n_samples=FLAGS.group_size)
                record["heldout_greedy_acc"], record["heldout_pass1"] = point["greedy_acc"], point["pass1"]
                console(f"{arm} iter {it}: reward {record['reward']:.3f}, held-out greedy "
                        f"{record['heldout_greedy_acc']:.3f} pass@1 {record['heldout_pass1']:.3f}, "
                        f"kl {record.get('kl', 0):.4f}, zero-var groups "
                        f"{record['zero_var_frac']:.2f}, clip {record['clip_frac']:.3f}, "
                        f"entropy {record['entropy']:.3f}, {record['time_s']:.0f}s")
            writer.write(it, {f"{arm}/{k}": v for k, v in record.items() if k != "iter" and math.isfinite(v)})

        # RFT runs until it has sampled as many response tokens as the first RL arm (up to 10x its iterations).
        params, history = grpo.train(
            sft_params, ref_params=sft_params, cfg=cfg, gc=gcs[arm], tc=tc, task=task, problems=train_problems,
            key=jax.random.fold_in(key, 2), max_iters=FLAGS.iters * (10 if arm == "rft" and budget else 1),
            token_budget=budget if arm == "rft" else None, kl_every=FLAGS.kl_every, on_iter=on_iter,
            row_bucket=FLAGS.row_bucket or None,
            time_budget_s=None if arm == "rft" or FLAGS.arm_minutes is None else 60 * FLAGS.arm_minutes,
        )
        if budget is None and arm != "rft":
            budget = history[-1]["sampled_tokens"]
        curves[arm] = history
        final = grpo.evaluate(params, heldout, task, eval_key, cfg=cfg, n_samples=FLAGS.group_size)
        console(f"{arm} on held-out after {len(history)} iterations ({time.perf_counter() - arm_start:.0f}s): "
                + json.dumps(final))
        rows_IB = {k: np.stack([r[k] for r in rows_by_iter]) for k in ("problem_B", "lengths_B", "rewards_B")}
        paired = grpo.paired_length_change(rows_IB["problem_B"], rows_IB["lengths_B"], rows_IB["rewards_B"] > 0,
                                           window=max(len(history) // 4, 1))
        summary.update({
            f"{arm}_greedy_acc": final["greedy_acc"], f"{arm}_pass1": final["pass1"], f"{arm}_pass8": final["pass_n"],
            f"{arm}_sampled_tokens": history[-1]["sampled_tokens"], f"{arm}_iters": len(history),
            f"{arm}_kl_final": window_mean(history, "kl", first=False),
            f"{arm}_zero_var_frac_start": window_mean(history, "zero_var_frac", first=True),
            f"{arm}_len_incorrect_start": window_mean(history, "len_incorrect", first=True),
            f"{arm}_len_incorrect_end": window_mean(history, "len_incorrect", first=False),
            f"{arm}_len_incorrect_excess_start": window_mean(history, "len_incorrect_excess", first=True),
            f"{arm}_len_incorrect_excess_end": window_mean(history, "len_incorrect_excess", first=False),
            **{f"{arm}_len_incorrect_paired_{k}": v if math.isfinite(v) else None for k, v in paired.items()},
            f"{arm}_len_correct_start": window_mean(history, "len_correct", first=True),
            f"{arm}_len_correct_end": window_mean(history, "len_correct", first=False),
            f"{arm}_time_s": time.perf_counter() - arm_start,
        })
    writer.close()
    plot(curves, os.path.join(FLAGS.workdir, "curves.png"))
    summary["wall_time_s"] = time.perf_counter() - wall_start
    summary["cpu_time_s"] = time.process_time() - cpu_start
    with open(os.path.join(FLAGS.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    console(json.dumps({k: summary[k] for k in ("sft_greedy_acc", "grpo_greedy_acc", "grpo_pass1", "grpo_pass8",
                                                "sft_pass8", "dr_grpo_greedy_acc", "rft_greedy_acc", "wall_time_s",
                                                "cpu_time_s")}))
    return summary


if __name__ == "__main__":
    app.run(absl_main(run))
