"""Scaling laws (Kaplan et al. 2020; Hoffmann et al. 2022): IsoFLOP sweeps, Chinchilla approaches 1–3, on a CPU.

    python -m experiments.scaling_laws --tier=smoke                 # < 3 min end to end (CI)
    python -m experiments.scaling_laws --tier=cpu --action=plan     # dry run: FLOPs and estimated time per run
    python -m experiments.scaling_laws --tier=cpu                   # calibrate lr, sweep, fit, report (resumable)
    python -m experiments.scaling_laws --tier=cpu --action=fit      # refit from the recorded runs only
    python -m experiments.scaling_laws --tier=cpu --action=verify   # retrain one recorded run, compare its loss
    python -m experiments.scaling_laws --tier=gpu --action=plan --nomeasure   # FLOPs and tokens, no timing

Actions: `plan` prints the dry run; `run` measures throughput (once), runs the learning-rate calibration, fits
lr* ∝ N^-γ and runs the IsoFLOP sweep; `fit` writes summary.json; `report` writes the plots and report.md; `all`
(default) does run, fit and report; `verify` retrains recorded runs (--verify_hash, default the cheapest sweep run)
in this process and fails unless each final loss matches its record within 1e-5. Rerunning with the same --workdir
skips every finished run (by config hash).
--workers=2 trains in two processes (one CPU device each), which keeps both cores of a 2-core machine busy.

Tiers: `smoke` tiny budgets for CI; `cpu` the embedded Python-stdlib corpus, byte-level, depth 2, widths of
~4k–250k parameters, budgets 1e11, 3e11, 1e12, 3e12 FLOPs, 6 sizes each; `gpu` a Chinchilla-style grid
(1e17–3e18 FLOPs, depth 12, BPE) for accelerator pods, sharded over --mesh.

Writes to --workdir: throughput.json, results.jsonl (one record per run), lr_law.json, summary.json, report.md,
isoflop.png, optimal_scaling.png, frontier.png, approach3.png. summary.json keys (stable):
    interior_minima           IsoFLOP curves with an interior minimum (≥ 2 runs each side, positive curvature)
    a_approach2               approach 2 exponent of N*(C) ∝ C^a, total parameters, C = 6·N·D
    a_approach2_nonembedding  the same with non-embedding parameters and C = 6·N_non-embedding·D (Kaplan)
    a_loo_spread              max − min of a_approach2 over leave-one-budget-out fits
    holdout_loss_rel_err      |L* predicted from the smaller budgets − L* fitted| / L* at the largest budget, the
                              prediction from L*(C) = E + k·C^γ with E of approach 3 on the smaller budgets' runs
    holdout_nstar_ratio       max(pred/fit, fit/pred) of N* at the largest budget, from the smaller budgets
    approach3                 E, A, B, alpha, beta per convention, starts converged, held-out error
    budgets                   per budget: n_star, d_star, l_star, tokens_per_param, interior
    wall_time_s               summed wall time of the recorded runs, compiles included (serial-equivalent: with
                              --workers the elapsed time is shorter)
plus `approaches` (every fit per FLOP convention, with bootstrap CIs), `criteria` (pass/fail of each acceptance
criterion), `lr_law` and `tier`. Everything but wall_time_s is a function of the recorded runs alone.
"""

from llmjax import runtime

runtime.use_all_cpu_cores()  # before JAX is imported

import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from llmjax import data as data_lib  # noqa: E402
from llmjax import sharding  # noqa: E402
from llmjax.errors import UserError, absl_main  # noqa: E402
from llmjax.metrics import console  # noqa: E402
from llmjax.scaling import analysis, plan, plots, runner  # noqa: E402

TIERS = {
    "smoke": plan.SweepConfig(
        budgets=(1e9, 3e9, 1e10), widths=(8, 16, 24, 32), sizes_per_budget=3, block_size=32, batch_size=8,
        calib_budget=1e9, calib_sizes=2, calib_lr_factors=(0.5, 1.0, 2.0), eval_batches=2,
        eval_fractions=(0.25, 0.5, 1.0), prior_lr=1e-2,
    ),
    "cpu": plan.SweepConfig(
        budgets=(1e11, 3e11, 1e12, 3e12), widths=(6, 8, 10, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 72, 80, 96),
        sizes_per_budget=6, block_size=64, batch_size=16, calib_budget=1e11, prior_tokens_per_param=80.0,
        prior_lr=1e-2, prior_lr_gamma=0.5, eval_batches=32,
    ),
    "gpu": plan.SweepConfig(
        budgets=(1e17, 3e17, 1e18, 3e18), widths=tuple(range(256, 2049, 128)), depth=12, sizes_per_budget=8,
        block_size=1024, batch_size=256, vocab_size=32768, head_dim=64, tokenizer="bpe",
        data="hf:wikitext:wikitext-103-raw-v1",
        chunk_steps=50, eval_batches=20, calib_budget=1e17, prior_lr=1e-3, prior_lr_n=1e8, prior_lr_gamma=0.3,
    ),
}

# The smoke tier fits approach 3 from a coarser grid of starts (and fewer bootstrap samples) to stay within CI time.
FIT_SETTINGS = {
    "smoke": {"grid": {"e": (0.0, 1.0), "a": (0.0, 5.0, 10.0), "b": (0.0, 5.0, 10.0), "alpha": (0.3, 1.0),
                       "beta": (0.3, 1.0)}, "n_boot": 40},
    "cpu": {"grid": None, "n_boot": 200},
    "gpu": {"grid": None, "n_boot": 200},
}

FLAGS = flags.FLAGS
flags.DEFINE_enum("tier", "smoke", list(TIERS), "sweep size: smoke (CI), cpu (this machine), gpu (pods)")
flags.DEFINE_enum("action", "all", ["all", "plan", "run", "fit", "report", "verify"],
                  "what to do (see the docstring)")
flags.DEFINE_string("workdir", None, "outputs; rerunning with it resumes (default runs/scaling_<tier>)")
flags.DEFINE_string("data", None, "override the tier's --data source (pystdlib | text:PATH | hf:NAME[:CONFIG])")
flags.DEFINE_string("data_cache", None, "token cache root (default ~/.cache/llmjax/data)")
flags.DEFINE_string("mesh", "auto", "device mesh, e.g. data:8 or data:4,fsdp:2; auto: one device on CPU, else "
                    "data-parallel over the devices that divide the batch")
flags.DEFINE_list("budgets", None, "override the tier's compute budgets in FLOPs, increasing, e.g. 1e11,3e11,1e12")
flags.DEFINE_list("widths", None, "override the tier's width grid (model sizes at fixed depth), e.g. 8,16,32,64")
flags.DEFINE_integer("sizes_per_budget", None, "override the tier's number of model sizes per budget", lower_bound=3)
flags.DEFINE_bool("retry_failed", False, "rerun runs recorded as failed")
flags.DEFINE_integer("workers", 1, "train runs in this many parallel processes (one CPU device each); on a "
                     "2-core CPU, 2 workers keep both cores busy with tiny models")
flags.DEFINE_integer("worker", -1, "internal: the index of a worker process started by --workers")
flags.DEFINE_enum("phase", "sweep", ["calibration", "sweep"], "internal: which runs a worker process trains")
flags.DEFINE_list("verify_hash", [], "verify: run hashes to retrain (default: the cheapest recorded sweep run)")
flags.DEFINE_bool("measure", True, "plan: measure throughput if throughput.json is missing (else print no times)")


SWEEP_OVERRIDES = ("data", "budgets", "widths", "sizes_per_budget")  # flags that replace a tier's field


def sweep_config() -> plan.SweepConfig:
    """The tier's sweep with --data / --budgets / --widths / --sizes_per_budget applied (a changed sweep hashes to
    new runs, so it never mixes with the tier's recorded ones)."""
    changes = {}
    for name, parse in (("budgets", float), ("widths", int)):
        if FLAGS[name].value is not None:
            try:
                changes[name] = tuple(parse(v) for v in FLAGS[name].value)
            except ValueError:
                raise UserError(f"--{name}={','.join(FLAGS[name].value)} is not a list of numbers: e.g. "
                                f"--{name}={'1e11,3e11' if name == 'budgets' else '8,16,32'}") from None
    for name in ("data", "sizes_per_budget"):
        if FLAGS[name].value is not None:
            changes[name] = FLAGS[name].value
    return dataclasses.replace(TIERS[FLAGS.tier], **changes).validate()


def workdir() -> str:
    return FLAGS.workdir or os.path.join("runs", f"scaling_{FLAGS.tier}")


def build_trainer(sweep: plan.SweepConfig) -> runner.Trainer:
    dataset = data_lib.prepare_data(sweep.data, sweep.tokenizer, cache_dir=FLAGS.data_cache,
                                    vocab_size=sweep.vocab_size if sweep.tokenizer == "bpe" else None)
    if dataset.tokenizer.vocab_size != sweep.vocab_size:
        raise UserError(f"{sweep.data} with tokenizer {sweep.tokenizer} has vocab {dataset.tokenizer.vocab_size}, "
                        f"the tier expects {sweep.vocab_size}: use the tier's tokenizer")
    if FLAGS.mesh == "auto":
        # On CPU one device: XLA's in-process all-reduce aborts the whole process when one device thread is starved
        # for 40 s (seen on this loaded machine), and a tiny model gains little from splitting its batch.
        n = 1 if jax.devices()[0].platform == "cpu" else max(
            d for d in range(1, jax.device_count() + 1) if jax.device_count() % d == 0 and sweep.batch_size % d == 0)
        mesh = sharding.make_mesh({"data": n, "fsdp": 1, "tensor": 1}, jax.devices()[:n])
    else:
        mesh = sharding.make_mesh(sharding.parse_mesh(FLAGS.mesh, jax.device_count()))
    sharding.check_batch_divides(sweep.batch_size, mesh)
    console(f"{sweep.data} ({sweep.tokenizer}): {len(dataset.train_tokens):,} train tokens; mesh {dict(mesh.shape)}")
    return runner.Trainer(dataset, mesh)


def throughput(sweep: plan.SweepConfig, trainer: runner.Trainer | None) -> plan.Throughput:
    """The measured throughput of this machine, cached in throughput.json (measured once per workdir)."""
    path = os.path.join(workdir(), "throughput.json")
    if os.path.exists(path):
        with open(path) as f:
            return plan.Throughput(**json.load(f))
    trainer = trainer or build_trainer(sweep)
    widths = sorted({w for c in sweep.budgets for w in plan.select_widths(sweep, c)})
    probe = sorted({widths[0], widths[len(widths) // 2], widths[-1]})
    console(f"measuring throughput at widths {probe} ...")
    measured = runner.measure_throughput(trainer, sweep, probe)
    _write_json(path, dataclasses.asdict(measured))
    return measured


def lr_law(sweep: plan.SweepConfig) -> plan.LrLaw | None:
    """The calibrated lr law if the calibration runs are all recorded, else None."""
    records = runner.ResultStore(os.path.join(workdir(), "results.jsonl")).load()
    hashes = [s.run_hash() for s in plan.plan_calibration(sweep)]
    if not all(h in records for h in hashes):
        return None
    law, _ = runner.fit_lr_law(records[h] for h in hashes)
    return law


def plan_main(sweep: plan.SweepConfig) -> None:
    measured = FLAGS.measure or os.path.exists(os.path.join(workdir(), "throughput.json"))
    tp = throughput(sweep, None) if measured else None
    law = lr_law(sweep)
    if law is None:
        console("lr calibration not run yet: sweep learning rates below use the prior lr law (they will change)")
        law = plan.prior_lr_law(sweep)
    specs = plan.plan_calibration(sweep) + plan.plan_sweep(sweep, law)
    table, _ = plan.dry_run_table(specs, tp, sweep.convention)
    _write_json(os.path.join(workdir(), "plan.json"), {
        "sweep": dataclasses.asdict(sweep),
        "runs": [{"hash": s.run_hash(), "kind": s.kind, "budget": s.budget, "width": s.width,
                  "n_total": sweep.n_total(s.width), "steps": s.steps, "tokens": s.tokens, "peak_lr": s.peak_lr,
                  "est_seconds": tp.run_seconds(s) if tp else None} for s in specs],
    })
    if tp:
        console(f"throughput: {tp.step_overhead_s * 1e3:.2f} ms/step + {1 / tp.s_per_flop / 1e9:.1f} GFLOP/s "
                "(FLOPs with attention)")
    console(table)
    console(f"wrote {os.path.join(workdir(), 'plan.json')}")


def run_main(sweep: plan.SweepConfig) -> None:
    """Calibrate the learning rate, fit lr*(N), run the sweep; with --workers, each phase in parallel processes."""
    if FLAGS.worker >= 0:
        return worker_main(sweep)
    trainers: list[runner.Trainer] = []

    def train(spec: plan.RunSpec) -> dict:  # the trainer (data, compiles) is built only if this process trains
        if not trainers:
            trainers.append(build_trainer(sweep))
        return trainers[0](spec)

    tp = throughput(sweep, None)
    store = runner.ResultStore(os.path.join(workdir(), "results.jsonl"))
    calibration = plan.plan_calibration(sweep)
    run_phase("calibration", calibration, tp, store, train)
    law, optima = runner.fit_lr_law(store.load()[s.run_hash()] for s in calibration)
    _write_json(os.path.join(workdir(), "lr_law.json"), {**dataclasses.asdict(law), "optima": optima})
    console(f"lr*(N) = {law.lr_ref:.3g}·(N/{law.n_ref:.3g})^-{law.gamma:.3f}")
    run_phase("sweep", plan.plan_sweep(sweep, law), tp, store, train)


def run_phase(phase: str, specs: list[plan.RunSpec], tp: plan.Throughput, store: runner.ResultStore,
              train: runner.TrainFn) -> None:
    console(plan.dry_run_table(specs, tp, sweep_config().convention)[0])
    done = store.load()
    pending = [s for s in specs if s.run_hash() not in done or (FLAGS.retry_failed and done[s.run_hash()]["status"]
                                                                 != "ok")]
    if FLAGS.workers > 1 and len(pending) > 1:
        shares = runner.split_for_workers(pending, [tp.run_seconds(s) for s in pending], FLAGS.workers)
        longest = max(sum(tp.run_seconds(s) for s in share) for share in shares)
        console(f"{phase}: {len(pending)} runs over {FLAGS.workers} workers, about {longest / 60:.1f} min "
                "(plus compiles) if each worker gets a core")
        procs = []
        for i, share in enumerate(s for s in shares if s):
            _write_json(os.path.join(workdir(), f"worker{i}.json"), {"hashes": [s.run_hash() for s in share]})
            args = [sys.executable, "-m", "experiments.scaling_laws", f"--tier={FLAGS.tier}", f"--workdir={workdir()}",
                    "--action=run", f"--worker={i}", f"--phase={phase}", f"--retry_failed={FLAGS.retry_failed}"]
            passed_on = (*SWEEP_OVERRIDES, "data_cache")
            args += [FLAGS[name].serialize() for name in passed_on if FLAGS[name].value is not None]
            env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
            procs.append(subprocess.Popen(args, env=env))
        for proc in procs:
            proc.wait()
    # Anything a worker did not finish (or everything, with one worker) is trained here.
    runner.run_all(specs, store, train, log=console, retry_failed=FLAGS.retry_failed)


def worker_main(sweep: plan.SweepConfig) -> None:
    """Train this worker's share of a phase (hashes chosen by the parent) on one device."""
    with open(os.path.join(workdir(), f"worker{FLAGS.worker}.json")) as f:
        hashes = set(json.load(f)["hashes"])
    if FLAGS.phase == "calibration":
        specs = plan.plan_calibration(sweep)
    else:
        specs = plan.plan_sweep(sweep, lr_law(sweep))
    store = runner.ResultStore(os.path.join(workdir(), "results.jsonl"))
    runner.run_all([s for s in specs if s.run_hash() in hashes], store, build_trainer(sweep),
                   log=lambda m: console(f"[worker {FLAGS.worker}] {m}"), retry_failed=FLAGS.retry_failed)


def fit_main(sweep: plan.SweepConfig) -> dict:
    law = lr_law(sweep)
    if law is None:
        raise UserError(f"no finished lr calibration in {workdir()}: run --action=run first")
    records = runner.ResultStore(os.path.join(workdir(), "results.jsonl")).load()
    specs = plan.plan_sweep(sweep, law)
    recorded = [records[s.run_hash()] for s in specs if s.run_hash() in records]
    if not any(r["status"] == "ok" for r in recorded):
        raise UserError(f"no finished sweep runs in {workdir()}: run --action=run first")
    summary = analysis.summarize(recorded, sweep, **FIT_SETTINGS[FLAGS.tier])
    summary.update(tier=FLAGS.tier, lr_law=dataclasses.asdict(law),
                   wall_time_s=sum(r["run_wall_s"] for r in records.values()))
    missing = len(specs) - len(recorded)
    if missing:
        console(f"warning: {missing} of {len(specs)} sweep runs are not recorded yet; fitting what there is "
                f"(--action=run finishes them)")
    for where, why in summary["degenerate"].items():
        console(f"warning: degenerate fit {where}: {why}")
    _write_json(os.path.join(workdir(), "summary.json"), summary)
    console(json.dumps({k: summary[k] for k in ("interior_minima", "a_approach2", "a_approach2_nonembedding",
                                                 "a_loo_spread", "holdout_loss_rel_err", "holdout_nstar_ratio")}))
    return summary


def report_main(sweep: plan.SweepConfig) -> None:
    with open(os.path.join(workdir(), "summary.json")) as f:
        summary = json.load(f)
    records = runner.ResultStore(os.path.join(workdir(), "results.jsonl")).load()
    sweep_records = [r for r in records.values() if r["spec"]["kind"] == "sweep" and r["status"] == "ok"]
    plots.write_all(workdir(), summary, sweep_records)
    with open(os.path.join(workdir(), "report.md"), "w") as f:
        f.write(analysis.report_markdown(summary, list(records.values()), FLAGS.tier))
    console(f"wrote report.md and plots to {workdir()}")


def verify_main(sweep: plan.SweepConfig) -> None:
    """Retrain recorded runs from their specs and compare final losses: runs must be reproducible to 1e-5."""
    records = runner.ResultStore(os.path.join(workdir(), "results.jsonl")).load()
    ok = [r for r in records.values() if r["status"] == "ok" and r["spec"]["kind"] == "sweep"]
    if not ok:
        raise UserError(f"no finished sweep runs in {workdir()}: run --action=run first")
    missing = [h for h in FLAGS.verify_hash if h not in records]
    if missing:
        raise UserError(f"--verify_hash {missing} not recorded in {workdir()}: use hashes from results.jsonl")
    chosen = [records[h] for h in FLAGS.verify_hash] or [min(ok, key=lambda r: r["run_wall_s"])]
    trainer = build_trainer(sweep)
    worst = 0.0
    for r in chosen:
        spec = plan.RunSpec(**{**r["spec"], "eval_fractions": tuple(r["spec"]["eval_fractions"])})
        if spec.run_hash() != r["hash"]:
            raise UserError(f"run {r['hash']} does not hash to its spec: results.jsonl is from another version")
        loss = trainer(spec)["final_loss"]
        worst = max(worst, abs(loss - r["final_loss"]))
        console(f"verify {r['hash']} C={spec.budget:.0e} d={spec.width}: recorded {r['final_loss']:.7f}, retrained "
                f"{loss:.7f}, |diff| {abs(loss - r['final_loss']):.2e}")
    if not worst <= 1e-5:
        raise UserError(f"a retrained run differs from its record by {worst:.2e} > 1e-5: training is not reproducible")


def _write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=lambda x: x.item())  # numpy scalars
    os.replace(tmp, path)


def main() -> None:
    sweep = sweep_config()
    if FLAGS.action == "plan":
        plan_main(sweep)
    if FLAGS.action in ("run", "all"):
        run_main(sweep)
    if FLAGS.action in ("fit", "all"):
        fit_main(sweep)
    if FLAGS.action in ("report", "all"):
        report_main(sweep)
    if FLAGS.action == "verify":
        verify_main(sweep)


if __name__ == "__main__":
    app.run(absl_main(main))
