"""RLHF with PPO (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences") in a world whose
ground truth is known, so reward hacking can be measured.

    python -m experiments.rlhf_ppo                         # markov world: pretrain → label pairs → RM → PPO arms
    python -m experiments.rlhf_ppo --seeds=0,1,2           # the acceptance run (stable keys: means over seeds)
    python -m experiments.rlhf_ppo --task=lexicon --data=tinyshakespeare
    python -m experiments.rlhf_ppo --smoke                 # CI smoke test (< 1 min); numbers are meaningless

The world (`llmjax/rl/world.py`): a known sparse Markov chain over 22 words writes the text, so its exact
log-likelihood scores naturalness; a hidden scorer r* (signed weights of positive / negative words, flipped after
"not") plays Ziegler's sentiment classifier, and a noisy Bradley–Terry labeller ranks pairs of reference samples.
A 2-layer, 64-wide transformer is pretrained on the chain's text (the reference policy), a reward model (the same
trunk + a scalar head at the last response token) is fitted to the labels (--rm_ensemble > 1: several, from their
own head inits and batch orders, scored by their mean), normalised to mean 0 / std 1 on reference samples, and
PPO fine-tunes the policy against it with a per-token KL penalty, in three arms from the same start: a fixed β
(--kl_coef, 0.05), the adaptive controller (target --target_kl nats, started at β = 0.1), and a small β
(--overopt_kl_coef, 0.01) that shows over-optimisation; that arm runs at a larger learning rate (--overopt_lr, 3×
--lr) for --overopt_iters iterations, so it gets far into the over-optimised regime within the time budget (at
--lr it took > 150 iterations on some seeds; at 3× its KL is far past β = 0.05's within 30). The shared
stages are cached in --workdir/shared.

Writes to --workdir: summary.json, metrics.jsonl (per PPO iteration, keys prefixed seed{s}/{arm}/), curves.png,
config.json. summary.json keys (means over --seeds; each also as `{key}_seeds`, a list in seed order):
    rm_acc_labels, rm_acc_true     reward model's (ensemble mean's) held-out pairwise accuracy vs the noisy labels /
                                   the true order
    ref_reward, ref_kl, ref_chain_ll, ref_distinct    the reference policy on fresh prompts (r* in world units)
    ppo_reward, ppo_kl             r* and sequence KL to the reference (nats) after PPO at --kl_coef
    ppo_chain_ll_drop              ref_chain_ll − chain log-likelihood per word after PPO (nats)
    ppo_distinct                   distinct words per response after PPO
    ppo_rm_score                   the normalised reward model's score after PPO
    adaptive_kl_final, adaptive_beta_final, adaptive_reward    the adaptive arm: final sequence KL, β, r*
    overopt_reward, overopt_kl, overopt_chain_ll_drop, overopt_distinct, overopt_rm_score   the small-β arm
    stage_s                        seconds per shared stage (0 when read from the cache), per seed
    wall_time_s                    the whole run
"""

import dataclasses
import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from llmjax.errors import UserError, absl_main
from llmjax.metrics import MetricsWriter, console
from llmjax.rl import pipeline, ppo, world

FLAGS = flags.FLAGS
flags.DEFINE_enum("task", "markov", ["markov", "lexicon"], "world: synthetic Markov chain, or words of a corpus")
flags.DEFINE_string("data", "tinyshakespeare", "--task=lexicon: the corpus")
flags.DEFINE_string("workdir", "runs/rlhf_ppo", "outputs; shared stages are cached in workdir/shared")
flags.DEFINE_list("seeds", ["0"], "run seeds (model init, samples, labels, PPO); the world is fixed by --world_seed")
flags.DEFINE_integer("world_seed", 0, "the chain and the word roles")
flags.DEFINE_bool("smoke", False, "CI smoke test: tiny budgets everywhere (< 1 min)")
flags.DEFINE_integer("iters", 60, "PPO iterations per arm")
flags.DEFINE_integer("rollouts_per_iter", 64, "responses sampled per PPO iteration")
flags.DEFINE_float("kl_coef", 0.05, "β of the fixed-β arm")
flags.DEFINE_enum("kl_estimator", "k1", ["k1", "k3"], "per-token KL penalty in the reward")
flags.DEFINE_float("target_kl", 5.0, "the adaptive arm's target sequence KL (nats); 0 skips the arm")
flags.DEFINE_integer("kl_horizon", 500, "the adaptive controller's horizon in samples")
flags.DEFINE_float("adaptive_init_kl_coef", 0.1, "the adaptive arm's starting β")
flags.DEFINE_float("overopt_kl_coef", 0.01, "β of the over-optimisation arm; 0 skips the arm")
flags.DEFINE_integer("overopt_iters", 40, "PPO iterations of the over-optimisation arm")
flags.DEFINE_float("overopt_lr", 3e-4, "learning rate of the over-optimisation arm")
flags.DEFINE_float("lr", 1e-4, "PPO learning rate")
flags.DEFINE_enum("aggregation", "token_mean", list(ppo.AGGREGATIONS), "how token losses are summed")
flags.DEFINE_enum("adam_eps_placement", "torch", ["torch", "tf"], "where Adam's ε goes")
flags.DEFINE_integer("rm_ensemble", 1, "reward models (own inits and batch orders) whose mean score PPO maximises")

SMOKE_PIPELINE = dict(pretrain_steps=30, n_train_prompts=256, n_pairs=256, n_heldout_pairs=256, rm_steps=10,
                      n_eval_prompts=256, n_embd=32, n_layer=1)


def world_config() -> world.WorldConfig:
    return world.WorldConfig(task=FLAGS.task, data=FLAGS.data, seed=FLAGS.world_seed).validate()


def pipeline_config() -> pipeline.PipelineConfig:
    return pipeline.PipelineConfig(**(SMOKE_PIPELINE if FLAGS.smoke else {}), rm_ensemble=FLAGS.rm_ensemble).validate()


def seeds() -> list[int]:
    try:
        return [int(s) for s in FLAGS.seeds]
    except ValueError:
        raise UserError(f"--seeds={','.join(FLAGS.seeds)}: give integers separated by commas") from None


def ppo_config(**overrides) -> ppo.PPOConfig:
    # --target_kl=0 only skips the adaptive arm; the fixed-β arms ignore target_kl but the config must be valid.
    fields = dict(kl_coef=FLAGS.kl_coef, kl_estimator=FLAGS.kl_estimator, target_kl=FLAGS.target_kl or 1.0,
                  kl_horizon=FLAGS.kl_horizon, rollouts_per_iter=FLAGS.rollouts_per_iter, learning_rate=FLAGS.lr,
                  aggregation=FLAGS.aggregation, adam_eps_placement=FLAGS.adam_eps_placement)
    if FLAGS.smoke:
        fields.update(rollouts_per_iter=16, epochs=1, minibatches=2)
    return ppo.PPOConfig(**(fields | overrides)).validate()


def mean_over(per_seed: list[dict], key: str) -> float:
    return float(np.mean([s[key] for s in per_seed]))


def plot(curves: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for name, history in curves.items():
        it = [h["iter"] for h in history]
        axes[0].plot(it, [h["true_reward"] for h in history], label=name)
        axes[1].plot(it, [h["score"] for h in history], label=name)
        axes[2].plot(it, [h["seq_kl"] for h in history], label=name)
        axes[3].plot(it, [h["distinct"] for h in history], label=name)
    titles = ["true reward r* (world units)", "reward model score (normalised)", "sequence KL to reference (nats)",
              "distinct words per response"]
    for ax, title in zip(axes, titles, strict=True):
        ax.set(xlabel="PPO iteration", title=title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run() -> dict:
    wall_start = time.perf_counter()
    iters = 3 if FLAGS.smoke else FLAGS.iters
    w = world.make_world(world_config())
    pc = pipeline_config()
    arms = {"ppo": ppo_config()}
    if FLAGS.target_kl > 0:
        arms["adaptive"] = ppo_config(adaptive_kl=True, kl_coef=FLAGS.adaptive_init_kl_coef)
    if FLAGS.overopt_kl_coef > 0:
        arms["overopt"] = ppo_config(kl_coef=FLAGS.overopt_kl_coef, learning_rate=FLAGS.overopt_lr)
    arm_iters = {name: iters for name in arms} | {"overopt": 3 if FLAGS.smoke else FLAGS.overopt_iters}
    os.makedirs(FLAGS.workdir, exist_ok=True)
    with open(os.path.join(FLAGS.workdir, "config.json"), "w") as f:
        json.dump({"world": dataclasses.asdict(w.cfg), "pipeline": dataclasses.asdict(pc),
                   "ppo": {k: dataclasses.asdict(v) for k, v in arms.items()}, "flags": FLAGS.flag_values_dict()},
                  f, indent=2, default=str)
    writer = MetricsWriter(FLAGS.workdir)
    per_seed, curves = [], {}
    for seed in seeds():
        shared = pipeline.shared_stages(FLAGS.workdir, w, pc, seed)
        console(f"seed {seed}: shared stages {json.dumps({k: round(v, 1) for k, v in shared['stage_s'].items()})} s; "
                f"reward model held-out accuracy {json.dumps(shared['rm_acc'])}")
        eval_key = jax.random.key(10_000 + seed)

        def evaluate(policy, shared=shared, eval_key=eval_key) -> dict:
            return pipeline.evaluate(policy, shared["ref"], w, shared["eval_prompts"], eval_key, cfg=shared["cfg"],
                                     rm=shared["rm"], rm_norm=shared["rm_norm"])

        ref = evaluate(shared["ref"])
        console(f"seed {seed} reference: {json.dumps(ref)}")
        out = {"rm_acc_labels": shared["rm_acc"]["acc_labels"], "rm_acc_true": shared["rm_acc"].get("acc_true"),
               "ref_reward": ref["reward"], "ref_kl": ref["kl"], "ref_chain_ll": ref["chain_ll"],
               "ref_distinct": ref["distinct"], "stage_s": shared["stage_s"]}
        for name, pcfg in arms.items():
            start = time.perf_counter()
            policy, history = pipeline.run_ppo(
                shared, w, pcfg, iters=arm_iters[name], seed=seed, tag=f"seed {seed} {name}",
                on_record=lambda it, r, name=name, seed=seed: writer.write(
                    it, {f"seed{seed}/{name}/{k}": v for k, v in r.items() if k != "iter"}))
            curves[f"seed {seed} {name} (β={pcfg.kl_coef}{', adaptive' if pcfg.adaptive_kl else ''})"] = history
            final = evaluate(policy)
            console(f"seed {seed} {name} ({time.perf_counter() - start:.0f}s): {json.dumps(final)}")
            out.update({f"{name}_reward": final["reward"], f"{name}_kl": final["kl"],
                        f"{name}_chain_ll_drop": ref["chain_ll"] - final["chain_ll"],
                        f"{name}_distinct": final["distinct"], f"{name}_rm_score": final["rm_score"],
                        f"{name}_time_s": time.perf_counter() - start})
            if name == "adaptive":
                out.update(adaptive_kl_final=final["kl"], adaptive_beta_final=history[-1]["beta"])
        per_seed.append(out)
    writer.close()
    plot(curves, os.path.join(FLAGS.workdir, "curves.png"))
    summary: dict = {}
    for key in per_seed[0]:
        values = [s[key] for s in per_seed]
        if key == "stage_s" or any(v is None for v in values):
            summary[key] = values
            continue
        summary[key] = float(np.mean(values))
        summary[f"{key}_seeds"] = values
    summary["seeds"] = seeds()
    summary["wall_time_s"] = time.perf_counter() - wall_start
    with open(os.path.join(FLAGS.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    stable = ("rm_acc_labels", "rm_acc_true", "ref_reward", "ppo_reward", "ppo_kl", "ppo_chain_ll_drop",
              "ppo_distinct", "adaptive_kl_final", "wall_time_s")
    console(json.dumps({k: summary.get(k) for k in stable}))
    return summary


if __name__ == "__main__":
    app.run(absl_main(run))
