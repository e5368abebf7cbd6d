"""Scaling-law tooling: accounting, planning, run hashing and resume, the learning-rate law, and the three fitters
on synthetic losses from a known L(N, D) = E + A/N^α + B/D^β surface."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import model
from llmjax.config import ModelConfig, from_preset
from llmjax.scaling import accounting, analysis, fits, plan, plots, runner

# Hoffmann et al. 2022's fitted surface (their eq. 10).
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
A_TRUE = BETA / (ALPHA + BETA)  # N_opt ∝ C^a
SMALL_GRID = {"e": (0.0, 1.0), "a": (0.0, 5.0, 10.0), "b": (0.0, 5.0, 10.0), "alpha": (0.2, 0.6), "beta": (0.2, 0.6)}


def surface(n: np.ndarray, d: np.ndarray) -> np.ndarray:
    return E + A / n**ALPHA + B / d**BETA


def isoflop_runs(budgets: tuple[float, ...] = (1e18, 3e18, 1e19, 3e19), sizes: int = 6, noise: float = 0.0,
                 seed: int = 0) -> fits.Runs:
    """Runs spanning ¼×–4× of the true optimum at each budget, C = 6·N·D, losses from the surface (× lognormal)."""
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    group, n = [], []
    for c in budgets:
        n_opt = g * (c / 6) ** A_TRUE
        group += [c] * sizes
        n += list(n_opt * np.geomspace(0.25, 4, sizes))
    group, n = np.array(group), np.array(n)
    d = group / (6 * n)
    loss = surface(n, d) * np.exp(np.random.default_rng(seed).normal(0, noise, len(n)))
    return fits.Runs(group=group, n=n, d=d, c=group.copy(), loss=loss)


# ------------------------------------------------------------------------------------------------ accounting


@pytest.mark.parametrize("cfg", [
    ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_head=1, n_embd=8),
    from_preset("llama_small")[0],
    ModelConfig(bias=True, tie_embeddings=False, mlp="swiglu", n_kv_head=2),
])
def test_param_counts_match_the_model(cfg: ModelConfig) -> None:
    counts = accounting.param_counts(cfg)
    shapes = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
    assert counts.total == model.count_params(shapes)
    table = cfg.vocab_size * cfg.n_embd + (cfg.block_size * cfg.n_embd if cfg.position == "learned" else 0)
    assert counts.embedding == table
    assert counts.head == (0 if cfg.tie_embeddings else cfg.n_embd * cfg.vocab_size)


def test_flop_conventions() -> None:
    cfg = ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=32)
    counts = accounting.param_counts(cfg)
    assert accounting.flops_per_token(cfg, "kaplan") == 6 * counts.non_embedding
    assert accounting.flops_per_token(cfg, "chinchilla") == 6 * counts.total
    assert accounting.flops_per_token(cfg, "attention") == 6 * counts.total + 12 * 2 * 64 * 32


# ------------------------------------------------------------------------------------------------ planning


CPU_LIKE = plan.SweepConfig(budgets=(1e11, 3e11, 1e12, 3e12), widths=(6, 8, 10, 12, 16, 20, 24, 28, 32, 40, 48, 56,
                                                                      64, 72, 80, 96), prior_tokens_per_param=80.0)


def test_planner_centres_sizes_on_the_prior_and_spans_quarter_to_four_times() -> None:
    sweep = CPU_LIKE.validate()
    specs = plan.plan_sweep(sweep, plan.prior_lr_law(sweep))
    assert len(specs) == 4 * 6
    for c in sweep.budgets:
        runs = [s for s in specs if s.budget == c]
        n = np.array([sweep.n_total(s.width) for s in runs])
        assert np.all(np.diff(n) > 0)
        n_star = sweep.prior_n_star(c)
        if n_star * 4 < sweep.n_total(sweep.widths[-1]):  # span fits inside the grid: centred on the prior
            assert 1 / 1.6 < n[0] / (n_star / 4) < 1.6 and 1 / 1.6 < n[-1] / (n_star * 4) < 1.6
        else:  # slid down to the top of the grid, keeping every size
            assert runs[-1].width == sweep.widths[-1]
        for s in runs:  # each run spends its budget (steps rounded to whole scan chunks)
            assert abs(s.flops("chinchilla") / c - 1) < 0.5 * s.chunk_steps / s.steps + 1e-9
            tokens_per_step = s.batch_size * s.block_size
            assert s.warmup_steps == min(max(10, math.ceil(sweep.n_total(s.width) / tokens_per_step)), s.steps // 2)


def test_dry_run_estimates_time_from_throughput() -> None:
    sweep = CPU_LIKE.validate()
    specs = plan.plan_sweep(sweep, plan.prior_lr_law(sweep))
    tp = plan.fit_throughput([1e8, 2e8, 4e8], [0.011, 0.021, 0.041], compile_s=10.0)
    assert tp.s_per_flop == pytest.approx(1e-10) and tp.step_overhead_s == pytest.approx(0.001)
    table, total = plan.dry_run_table(specs, tp, "chinchilla")
    n_widths = len({s.width for s in specs})
    assert total == pytest.approx(sum(tp.run_seconds(s) for s in specs) + 10.0 * n_widths)
    assert len(table.splitlines()) == len(specs) + 2


def test_run_hash_identifies_the_resolved_config() -> None:
    sweep = CPU_LIKE.validate()
    spec = plan.make_run(sweep, "sweep", 1e11, 16, 1e-2)
    assert spec.run_hash() == plan.make_run(sweep, "sweep", 1e11, 16, 1e-2).run_hash()
    for field, value in (("peak_lr", 2e-2), ("width", 20), ("seed", 1), ("steps", spec.steps + 8)):
        assert dataclasses.replace(spec, **{field: value}).run_hash() != spec.run_hash()


def test_lr_schedule_warmup_then_cosine_to_the_last_step() -> None:
    lr = lambda step: float(runner.lr_at(jnp.asarray(step), 1e-2, 10.0, 110.0, 0.1))
    assert lr(0) == pytest.approx(1e-2 / 11)
    assert lr(10) == pytest.approx(1e-2)
    assert lr(60) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99))), rel=1e-5)
    assert lr(109) == pytest.approx(1e-3)


def test_fit_lr_law_recovers_gamma() -> None:
    records = []
    for width, n in ((8, 4e3), (16, 1.2e4), (40, 5e4)):
        lr_star = 0.01 * (n / 1e4) ** -0.4
        for factor in (0.25, 0.5, 1.0, 2.0, 4.0):
            lr = lr_star * factor * 1.3  # the grid is not centred on the optimum
            records.append({"status": "ok", "spec": {"kind": "lr_calibration", "width": width, "peak_lr": lr},
                            "n_total": n, "final_loss": 2.0 + 0.1 * math.log(lr / lr_star) ** 2})
    law, optima = runner.fit_lr_law(records)
    assert law.gamma == pytest.approx(0.4, abs=1e-6)
    assert law(1e4) == pytest.approx(0.01, rel=1e-6)
    assert len(optima) == 3


# ------------------------------------------------------------------------------------------------ fitters


def test_approach2_recovers_a_known_exponent_exactly() -> None:
    """IsoFLOP curves that are exact parabolas in log N around N* = 0.3·C^0.6."""
    group, n, loss = [], [], []
    for c in (1e15, 1e16, 1e17, 1e18):
        n_star = 0.3 * c**0.6
        for f in np.geomspace(0.25, 4, 6):
            group.append(c)
            n.append(n_star * f)
            loss.append(5.0 * c**-0.05 + 0.2 * math.log(f) ** 2)
    group, n = np.array(group), np.array(n)
    runs = fits.Runs(group=group, n=n, d=group / (6 * n), c=group.copy(), loss=np.array(loss))
    fit = fits.approach2(runs)
    assert fit.n_star.exponent == pytest.approx(0.6, abs=1e-6)
    assert fit.d_star.exponent == pytest.approx(0.4, abs=1e-6)
    assert fit.l_star.exponent == pytest.approx(-0.05, abs=1e-6)
    assert all(f.interior for f in fit.fits)
    assert fits.leave_one_budget_out(runs) == pytest.approx([0.6] * 4, abs=1e-6)
    held = fits.holdout(runs)
    assert held["nstar_ratio"] == pytest.approx(1.0, abs=1e-6) and held["loss_rel_err"] < 1e-6


def test_isoflop_parabola_weights_runs_by_tokens() -> None:
    """Exact parabolas are fitted exactly; with loss noise that grows as runs get shorter (σ ∝ 1/D, as replicated
    cpu-tier runs show), weighting by D locates N* better than equal weights."""
    n = 1e4 * np.geomspace(0.25, 4, 6)
    c = 1e12
    d = c / (6 * n)
    loss = 2.0 + 0.2 * np.log(n / 1e4) ** 2

    def log_err(loss: np.ndarray) -> float:
        runs = fits.Runs(group=np.full(6, c), n=n, d=d, c=np.full(6, c), loss=loss)
        return math.log(fits.fit_isoflop(runs, c).n_star / 1e4)

    assert log_err(loss) == pytest.approx(0.0, abs=1e-9)
    noise = np.random.default_rng(0).normal(0, 1, (200, 6)) * 0.005 * d.max() / d
    weighted = [log_err(loss + e) for e in noise]
    unweighted = [-p[1] / (2 * p[0]) - math.log(1e4) for p in (np.polyfit(np.log(n), loss + e, 2) for e in noise)]
    assert np.sqrt(np.mean(np.square(weighted))) < 0.95 * np.sqrt(np.mean(np.square(unweighted)))


def test_approach2_on_the_surface_recovers_beta_over_alpha_plus_beta() -> None:
    fit = fits.approach2(isoflop_runs(noise=0.002))
    assert fit.n_star.exponent == pytest.approx(A_TRUE, abs=0.03)
    assert fit.d_star.exponent == pytest.approx(1 - A_TRUE, abs=0.03)
    ci = fits.bootstrap_approach2(isoflop_runs(noise=0.002), n_boot=50)
    assert ci["a"][0] <= fit.n_star.exponent <= ci["a"][1]


def test_loss_frontier_above_the_irreducible_loss() -> None:
    """On the surface L*(C) = E + K·C^(−αβ/(α+β)): with E given, approach 2 recovers that exponent and predicts the
    held-out largest budget's L* far better than a plain power law (which bends the wrong way)."""
    runs = isoflop_runs(budgets=(1e18, 3e18, 1e19, 3e19, 1e20))
    fit = fits.approach2(runs, irreducible=E)
    assert fit.l_star.irreducible == E
    assert fit.l_star.exponent == pytest.approx(-ALPHA * BETA / (ALPHA + BETA), abs=0.005)
    with_e, plain = fits.holdout(runs, irreducible=E), fits.holdout(runs)
    assert with_e["loss_rel_err"] < 1e-3 < plain["loss_rel_err"]
    assert with_e["l_star_pred"] > plain["l_star_pred"]
    # E at or above some L* leaves no power law above it: the frontier falls back to E = 0.
    assert fits.approach2(runs, irreducible=10.0).l_star.irreducible == 0.0


def test_approach3_recovers_the_surface() -> None:
    """Noise-free: exact. With 0.2% lognormal noise: exponents within 0.03, E within 5%, a within 0.02."""
    exact = fits.approach3(*_nd_loss(isoflop_runs()), grid=SMALL_GRID)
    for got, want in zip((exact.E, exact.A, exact.B, exact.alpha, exact.beta), (E, A, B, ALPHA, BETA), strict=True):
        assert got == pytest.approx(want, rel=1e-3)
    assert exact.n_at_best >= 1 and exact.n_converged <= exact.n_starts == 72
    noisy = fits.approach3(*_nd_loss(isoflop_runs(noise=0.002)), grid=SMALL_GRID)
    assert noisy.alpha == pytest.approx(ALPHA, abs=0.03) and noisy.beta == pytest.approx(BETA, abs=0.03)
    assert noisy.E == pytest.approx(E, rel=0.05)
    assert noisy.beta / (noisy.alpha + noisy.beta) == pytest.approx(A_TRUE, abs=0.02)
    n_opt, d_opt = exact.optimal(1e21)  # closed form: N_opt·D_opt = C/6, and it minimises L along the IsoFLOP
    assert n_opt * d_opt == pytest.approx(1e21 / 6)
    n_grid = n_opt * np.geomspace(0.5, 2, 101)
    assert np.argmin(surface(n_grid, 1e21 / (6 * n_grid))) == 50


def _nd_loss(runs: fits.Runs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return runs.n, runs.d, runs.loss


def test_approach1_envelope_follows_the_optimum() -> None:
    """Loss curves of many sizes (each a run's loss at fractions of its tokens): the envelope's N grows as C^a."""
    c_pts, n_pts, d_pts, loss_pts = [], [], [], []
    for n in np.geomspace(1e7, 1e11, 33):
        d_max = 3e21 / (6 * n)
        for f in np.geomspace(1e-3, 1, 40):
            d = d_max * f
            c_pts.append(6 * n * d)
            n_pts.append(n)
            d_pts.append(d)
            loss_pts.append(surface(n, d))
    fit = fits.approach1(*(np.array(x) for x in (c_pts, n_pts, d_pts, loss_pts)), n_bins=15)
    assert fit.n_star is not None and fit.n_star.exponent == pytest.approx(A_TRUE, abs=0.05)


def test_lbfgs_batched_minimises_every_start() -> None:
    """Rosenbrock from several starts: all converge to (1, 1)."""
    def rosen(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, b = x[:, 0], x[:, 1]
        f = (1 - a) ** 2 + 100 * (b - a**2) ** 2
        g = np.stack([-2 * (1 - a) - 400 * a * (b - a**2), 200 * (b - a**2)], axis=1)
        return f, g

    x, f, converged = fits.lbfgs_batched(rosen, np.array([[-1.2, 1.0], [2.0, 2.0], [0.0, 0.0]]), max_iter=2000)
    assert converged.all()
    np.testing.assert_allclose(x, 1.0, atol=1e-4)


# ------------------------------------------------------------------------------------------------ runner


def fake_train(spec: plan.RunSpec, fail_width: int) -> dict:
    """A deterministic stand-in for training: the surface's loss at (N, tokens), scaled to this tiny regime."""
    if spec.width == fail_width:
        raise RuntimeError("simulated out of memory")
    cfg = spec.model_config()
    counts = accounting.param_counts(cfg)
    curve = [{"step": s, "fraction": s / spec.steps, "val_loss": float(surface(counts.total * 1e4, spec.tokens
                                                                                 * s / spec.steps * 1e3)),
              "train_loss": 0.0} for s in spec.eval_steps()]
    return {"final_loss": curve[-1]["val_loss"], "curve": curve, "tokens": spec.tokens, "n_total": counts.total,
            "n_non_embedding": counts.non_embedding, "flops": {c: spec.flops(c) for c in accounting.CONVENTIONS}}


class Killed(BaseException):
    """Like SIGKILL for the sweep: not an Exception, so `run_all` does not record it as a failed run."""


def test_killed_sweep_resumes_to_the_same_summary(tmp_path) -> None:
    sweep = dataclasses.replace(CPU_LIKE, eval_fractions=(0.5, 1.0)).validate()
    specs = plan.plan_sweep(sweep, plan.prior_lr_law(sweep))

    def summary(records: dict) -> dict:
        return analysis.summarize([records[s.run_hash()] for s in specs if s.run_hash() in records], sweep,
                                  grid=SMALL_GRID, n_boot=10)

    fail_width = specs[2].width  # fails in every budget that has it, the first time before the kill
    train = lambda spec: fake_train(spec, fail_width)
    whole = runner.run_all(specs, runner.ResultStore(str(tmp_path / "a.jsonl")), train, log=lambda _: None)
    attempted = []

    def killed_at_the_seventh_run(spec: plan.RunSpec) -> dict:
        if len(attempted) == 6:
            raise Killed
        attempted.append(spec)
        return train(spec)

    store = runner.ResultStore(str(tmp_path / "b.jsonl"))
    with pytest.raises(Killed):
        runner.run_all(specs, store, killed_at_the_seventh_run, log=lambda _: None)
    assert len(store.load()) == 6 and sum(r["status"] == "failed" for r in store.load().values()) == 1
    rerun = []
    resumed = runner.run_all(specs, store, lambda s: rerun.append(s) or train(s), log=lambda _: None)
    assert len(rerun) == len(specs) - 6  # finished hashes (ok or failed) are skipped
    failed = [r for r in resumed.values() if r["status"] == "failed"]
    assert failed and all("simulated out of memory" in r["error"] for r in failed)
    assert summary(resumed) == summary(whole)
    assert summary(whole)["n_failed"] == len(failed)


def test_result_store_append_is_atomic(tmp_path, monkeypatch) -> None:
    store = runner.ResultStore(str(tmp_path / "results.jsonl"))
    store.append({"hash": "a", "status": "ok"})
    before = (tmp_path / "results.jsonl").read_text()

    def crash(*args: object) -> None:
        raise OSError("killed while replacing")

    monkeypatch.setattr(runner.os, "replace", crash)
    with pytest.raises(OSError):
        store.append({"hash": "b", "status": "ok"})
    assert (tmp_path / "results.jsonl").read_text() == before
    assert list(store.load()) == ["a"]


def test_split_for_workers_balances_estimated_time() -> None:
    sweep = CPU_LIKE.validate()
    specs = plan.plan_sweep(sweep, plan.prior_lr_law(sweep))
    seconds = [float(s.steps) for s in specs]
    shares = runner.split_for_workers(specs, seconds, 2)
    assert sorted(s.run_hash() for share in shares for s in share) == sorted(s.run_hash() for s in specs)
    assert not {s.width for s in shares[0]} & {s.width for s in shares[1]}  # each width compiled once
    loads = [sum(s.steps for s in share) for share in shares]
    width_loads = [sum(s.steps for s in specs if s.width == w) for w in {s.width for s in specs}]
    assert max(loads) - min(loads) <= max(width_loads)


def test_parallel_appends_keep_every_record(tmp_path) -> None:
    store = runner.ResultStore(str(tmp_path / "results.jsonl"))
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: store.append({"hash": str(i), "status": "ok"}), range(40)))
    assert sorted(store.load(), key=int) == [str(i) for i in range(40)]


# ------------------------------------------------------------------------------------------------ degenerate data


def sweep_records(loss_of: Callable[[float, float], float], budgets: tuple[float, ...] = CPU_LIKE.budgets) -> tuple:
    """Finished records of the CPU_LIKE sweep (restricted to `budgets`) whose losses come from `loss_of(N, D)`."""
    sweep = dataclasses.replace(CPU_LIKE, budgets=budgets, eval_fractions=(0.5, 1.0)).validate()
    records = []
    for spec in plan.plan_sweep(sweep, plan.prior_lr_law(sweep)):
        counts = accounting.param_counts(spec.model_config())
        curve = [{"step": s, "fraction": s / spec.steps, "train_loss": 0.0,
                  "val_loss": loss_of(counts.total, spec.tokens * s / spec.steps)} for s in spec.eval_steps()]
        records.append({"spec": dataclasses.asdict(spec), "status": "ok", "final_loss": curve[-1]["val_loss"],
                        "curve": curve, "tokens": spec.tokens, "n_total": counts.total,
                        "n_non_embedding": counts.non_embedding, "run_wall_s": 1.0,
                        "flops": {c: spec.flops(c) for c in accounting.CONVENTIONS}})
    return records, sweep


def test_summarize_marks_monotone_isoflop_curves_degenerate() -> None:
    """Loss falls with N at every budget (a data-starved surface turned around): no budget has a minimum."""
    records, sweep = sweep_records(lambda n, d: 2.0 + 50.0 / n**0.5)
    summary = analysis.summarize(records, sweep, grid=SMALL_GRID, n_boot=4)
    a2 = summary["approaches"]["chinchilla"]["approach2"]
    assert "no interior minimum" in a2["degenerate"]
    assert all(b["degenerate"] for b in a2["budgets"].values())
    assert summary["degenerate"]["chinchilla/approach2"] == a2["degenerate"]
    assert summary["interior_minima"] == 0 and not summary["criteria"]["interior_minima"]


def test_approach3_keeps_a_vanishing_irreducible_loss_as_fitted() -> None:
    """A pure power law in N and D has E = 0: log E runs off to −∞ and exp underflows, yet the fit, its optimum,
    the bootstrap (restarted from θ) and the summary all return, with E marked degenerate."""
    runs = isoflop_runs()
    loss = A / runs.n**ALPHA + B / runs.d**BETA
    fit = fits.approach3(runs.n, runs.d, loss, init=np.array([-800.0, math.log(A), math.log(B), ALPHA, BETA]))
    assert fit.E == 0.0 and math.isfinite(fit.theta[0])
    assert "E ran off to 0" in fit.degenerate
    n_opt, d_opt = fit.optimal(1e20)
    assert n_opt * d_opt == pytest.approx(1e20 / 6)
    ci = fits.bootstrap_approach3(runs.n, runs.d, loss, fit, n_boot=3)
    assert ci["alpha"][0] == pytest.approx(ALPHA, rel=1e-3)

    records, sweep = sweep_records(lambda n, d: 40.0 / n**0.3 + 40.0 / d**0.3)
    summary = analysis.summarize(records, sweep, grid=SMALL_GRID, n_boot=4)
    for conv in analysis.APPROACH3_CONVENTIONS:
        a3 = summary["approaches"][conv]["approach3"]
        assert "E ran off to 0" in a3["degenerate"] and a3["log_EAB"][0] < math.log(1e-6)
        reported = summary["degenerate"][f"{conv}/approach3"]
        assert reported == a3["degenerate"] == summary["approach3"][conv]["degenerate"]


def test_two_budgets_and_too_few_runs_are_degenerate_not_errors() -> None:
    records, sweep = sweep_records(lambda n, d: float(surface(n * 1e4, d * 1e3)), budgets=CPU_LIKE.budgets[:2])
    summary = analysis.summarize(records, sweep, grid=SMALL_GRID, n_boot=4)
    assert summary["holdout_nstar_ratio"] is None and summary["a_loo_spread"] is None
    assert summary["approaches"]["chinchilla"]["approach2"]["degenerate"] is None  # two budgets make a law
    one = analysis.summarize(records[:6], sweep, grid=SMALL_GRID, n_boot=4)
    assert "1 budget(s)" in one["degenerate"]["chinchilla/approach2"] and one["a_approach2"] is None
    none = analysis.summarize(records[:2], sweep, grid=SMALL_GRID, n_boot=4)
    assert "0 runs for 5 parameters" in none["degenerate"]["chinchilla/approach3"]
    assert "fewer than two sizes" in none["degenerate"]["chinchilla/approach1"]
    assert "0 budget(s)" in none["degenerate"]["kaplan/approach2"]


def test_report_and_plots_list_degenerate_fits(tmp_path) -> None:
    records, sweep = sweep_records(lambda n, d: 2.0 + 50.0 / n**0.5)
    summary = {**analysis.summarize(records, sweep, grid=SMALL_GRID, n_boot=4), "wall_time_s": 1.0}
    report = analysis.report_markdown(summary, records, "test")
    assert "## Degenerate fits" in report and "no interior minimum" in report
    paths = plots.write_all(str(tmp_path), summary, records)
    assert str(tmp_path / "isoflop.png") in paths and str(tmp_path / "optimal_scaling.png") not in paths
