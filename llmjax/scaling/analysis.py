"""From run records to the sweep's summary (every approach under every FLOP convention) and its markdown report.

Pure functions of the records: the same records give the same summary, which is what makes a resumed sweep
reproduce an uninterrupted one.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from llmjax.scaling import fits
from llmjax.scaling.plan import SweepConfig

Record = dict[str, Any]
APPROACH3_CONVENTIONS = ("kaplan", "chinchilla")  # approach 3 needs C = 6·N·D; the attention term breaks that form


def budget_key(budget: float) -> str:
    return f"{budget:.0e}"


def runs_for(records: list[Record], convention: str) -> fits.Runs:
    """Final losses of the finished sweep runs, with N and C as `convention` counts them; budgets with fewer than
    three finished runs (no parabola yet) are left out."""
    ok = [r for r in records if r["status"] == "ok" and r["spec"]["kind"] == "sweep"]
    per_budget = Counter(r["spec"]["budget"] for r in ok)
    ok = [r for r in ok if per_budget[r["spec"]["budget"]] >= 3]
    n_key = "n_non_embedding" if convention == "kaplan" else "n_total"
    return fits.Runs(
        group=np.array([r["spec"]["budget"] for r in ok], float), n=np.array([r[n_key] for r in ok], float),
        d=np.array([r["tokens"] for r in ok], float), c=np.array([r["flops"][convention] for r in ok], float),
        loss=np.array([r["final_loss"] for r in ok], float),
    )


def curve_points(records: list[Record], convention: str) -> tuple[np.ndarray, ...]:
    """(C, N, D, loss) at every recorded point of every run's validation-loss curve, for approach 1."""
    n_key = "n_non_embedding" if convention == "kaplan" else "n_total"
    rows = [(r["flops"][convention] * p["fraction"], r[n_key], r["tokens"] * p["fraction"], p["val_loss"])
            for r in records if r["status"] == "ok" and r["spec"]["kind"] == "sweep" for p in r["curve"]]
    return tuple(np.array(col, float) for col in zip(*rows, strict=True))


def _approach2_summary(runs: fits.Runs, n_boot: int, irreducible: float, irreducible_heldout: float) -> dict[str, Any]:
    """`irreducible`: approach 3's E on these runs; `irreducible_heldout`: on all but the largest budget's runs."""
    fit = fits.approach2(runs, irreducible)
    loo = [a for a in fits.leave_one_budget_out(runs) if math.isfinite(a)]
    out: dict[str, Any] = {
        "degenerate": fit.degenerate,
        "a": fit.n_star.exponent, "b": fit.d_star.exponent, "l_exponent": fit.l_star.exponent,
        "n_star_coef": fit.n_star.coef, "d_star_coef": fit.d_star.coef, "l_star_coef": fit.l_star.coef,
        "l_star_irreducible": fit.l_star.irreducible,
        "loo_a": loo, "loo_spread": max(loo) - min(loo) if loo else math.nan,
        "ci90": fits.bootstrap_approach2(runs, n_boot=n_boot, irreducible=fit.l_star.irreducible),
        "budgets": {
            budget_key(f.group): {
                "n_star": f.n_star, "d_star": f.d_star, "c_star": f.c_star, "l_star": f.l_star,
                "tokens_per_param": f.d_star / f.n_star, "interior": f.interior, "left": f.left, "right": f.right,
                "coeffs": list(f.coeffs), "degenerate": f.degenerate,
            }
            for f in fit.fits
        },
    }
    out["holdout"] = fits.holdout(runs, irreducible_heldout) if len(np.unique(runs.group)) >= 3 else None
    return out


def _approach3_fits(runs: fits.Runs, grid: dict | None) -> tuple[fits.Approach3, fits.Approach3 | None]:
    """Approach 3 on all runs, and on all but the largest budget's runs (None with fewer than three budgets)."""
    groups = np.unique(runs.group)
    fit = fits.approach3(runs.n, runs.d, runs.loss, grid=grid)
    if len(groups) < 3:
        return fit, None
    train = runs.take(runs.group != groups[-1])
    return fit, fits.approach3(train.n, train.d, train.loss, grid=grid)


def _approach3_summary(runs: fits.Runs, fit: fits.Approach3, held: fits.Approach3 | None,
                       n_boot: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "E": fit.E, "A": fit.A, "B": fit.B, "alpha": fit.alpha, "beta": fit.beta, "log_EAB": list(fit.theta[:3]),
        "a": fit.a, "b": 1.0 - fit.a, "degenerate": fit.degenerate,
        "n_starts": fit.n_starts, "n_converged": fit.n_converged, "n_at_best": fit.n_at_best,
        "ci90": fits.bootstrap_approach3(runs.n, runs.d, runs.loss, fit, n_boot=n_boot),
    }
    groups = np.unique(runs.group)
    if held is not None:  # held out: fit without the largest budget, predict its runs and its optimum
        largest = runs.group == groups[-1]
        pred = held.loss(runs.n[largest], runs.d[largest])
        n_opt, d_opt = held.optimal(groups[-1])
        out["heldout_loss_rel_err"] = float(np.mean(np.abs(pred - runs.loss[largest]) / runs.loss[largest]))
        out["heldout_fit"] = {"E": held.E, "A": held.A, "B": held.B, "alpha": held.alpha, "beta": held.beta}
        out["heldout_l_opt_pred"] = float(held.loss(n_opt, d_opt))
    else:
        out["heldout_loss_rel_err"] = math.nan
    n_opt, d_opt = fit.optimal(np.asarray(groups))
    out["optimal"] = {budget_key(c): {"n_opt": float(n), "d_opt": float(d)}
                      for c, n, d in zip(groups, n_opt, d_opt, strict=True)}
    return out


def summarize(records: list[Record], sweep: SweepConfig, grid: dict | None = None, n_boot: int = 200) -> dict:
    """The summary.json content (all keys but wall_time_s / tier / lr_law, which the experiment adds)."""
    approaches: dict[str, Any] = {}
    # Approach 3 fits L(N, D), which involves no FLOP convention: the `attention` convention counts N as
    # `chinchilla` does, so it shares that fit (and its irreducible loss E for the L*(C) frontier).
    a3_fits = {conv: _approach3_fits(runs_for(records, conv), grid) for conv in APPROACH3_CONVENTIONS}
    a3_fits["attention"] = a3_fits["chinchilla"]
    for convention in ("kaplan", "chinchilla", "attention"):
        runs = runs_for(records, convention)
        c, n, d, loss = curve_points(records, convention)
        a1 = fits.approach1(c, n, d, loss)
        a3_all, a3_held = a3_fits[convention]
        approaches[convention] = {
            "approach1": {"degenerate": a1.degenerate, "a": a1.n_star.exponent if a1.n_star else math.nan,
                          "b": a1.d_star.exponent if a1.d_star else math.nan,
                          "envelope": [[float(x) for x in p] for p in zip(a1.c, a1.n, a1.d, a1.loss, strict=True)]},
            "approach2": _approach2_summary(runs, n_boot, a3_all.E, a3_held.E if a3_held else math.nan),
        }
        if convention in APPROACH3_CONVENTIONS:
            approaches[convention]["approach3"] = _approach3_summary(runs, a3_all, a3_held, n_boot // 2)
    main = approaches["chinchilla"]["approach2"]
    budgets = {k: {key: v[key] for key in ("n_star", "d_star", "l_star", "tokens_per_param", "interior")}
               for k, v in main["budgets"].items()}
    ordered = [main["budgets"][budget_key(c)] for c in sorted({r["spec"]["budget"] for r in records
                                                               if r["spec"]["kind"] == "sweep"})
               if budget_key(c) in main["budgets"]]
    holdout = main["holdout"] or {"loss_rel_err": math.nan, "nstar_ratio": math.nan}
    interior = sum(b["interior"] for b in budgets.values())
    criteria = {
        "interior_minima": interior >= len(sweep.budgets) - 1,
        "nstar_dstar_increase_lstar_decreases": bool(
            all(x["n_star"] < y["n_star"] and x["d_star"] < y["d_star"] and x["l_star"] > y["l_star"]
                for x, y in zip(ordered, ordered[1:], strict=False))),
        "a_in_0.35_0.70": bool(0.35 <= main["a"] <= 0.70),
        "loo_spread_le_0.10": bool(main["loo_spread"] <= 0.10),
        "holdout_loss_within_2pct": bool(holdout["loss_rel_err"] <= 0.02),
        "holdout_nstar_within_1.5x": bool(holdout["nstar_ratio"] <= 1.5),
    }
    a3 = {conv: {k: approaches[conv]["approach3"][k] for k in
                 ("E", "A", "B", "alpha", "beta", "a", "n_starts", "n_converged", "n_at_best", "heldout_loss_rel_err",
                  "degenerate")}
          for conv in APPROACH3_CONVENTIONS}
    return _json_ready({
        "interior_minima": interior,
        "a_approach2": main["a"],
        "a_approach2_nonembedding": approaches["kaplan"]["approach2"]["a"],
        "a_loo_spread": main["loo_spread"],
        "holdout_loss_rel_err": holdout["loss_rel_err"],
        "holdout_nstar_ratio": holdout["nstar_ratio"],
        "approach3": a3,
        "budgets": budgets,
        "criteria": criteria,
        "degenerate": degeneracies(approaches),
        "approaches": approaches,
        "n_runs": sum(r["spec"]["kind"] == "sweep" for r in records),
        "n_failed": sum(r["status"] != "ok" for r in records),
    })


def degeneracies(approaches: dict[str, Any]) -> dict[str, str]:
    """Every degenerate fit, keyed `convention/approach` (or `convention/approach2/budget`), with the reason."""
    out = {}
    for conv, by_approach in approaches.items():
        for name, fit in by_approach.items():
            if fit["degenerate"]:
                out[f"{conv}/{name}"] = fit["degenerate"]
        for budget, vertex in by_approach["approach2"]["budgets"].items():
            if vertex["degenerate"]:
                out[f"{conv}/approach2/{budget}"] = vertex["degenerate"]
    return out


def _json_ready(obj: Any) -> Any:
    """Plain Python values with NaN/inf as None, so summary.json is strict JSON and compares equal after a reload."""
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _f(x: float | None, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def report_markdown(summary: dict, records: list[Record], tier: str) -> str:
    """A human-readable report: criteria, per-budget optima, exponents per approach and convention, all runs."""
    main = summary["approaches"]["chinchilla"]["approach2"]
    lines = [f"# Scaling laws — tier `{tier}`", "",
             f"{summary['n_runs']} sweep runs ({summary['n_failed']} failed records), recorded wall time "
             f"{summary['wall_time_s'] / 60:.1f} min.", "", "## Acceptance criteria", "",
             "| criterion | pass |", "|---|---|"]
    lines += [f"| {k} | {'yes' if v else 'no'} |" for k, v in summary["criteria"].items()]
    if summary["degenerate"]:
        lines += ["", "## Degenerate fits (their numbers below are not scaling laws)", ""]
        lines += [f"- `{where}`: {why}" for where, why in summary["degenerate"].items()]
    lines += ["", f"- interior minima: {summary['interior_minima']}",
              f"- a (approach 2, total params): {_f(summary['a_approach2'])}; non-embedding: "
              f"{_f(summary['a_approach2_nonembedding'])}; leave-one-budget-out spread {_f(summary['a_loo_spread'])}",
              f"- hold-out (fit on smaller budgets, predict the largest): L* rel. error "
              f"{_f(summary['holdout_loss_rel_err'], '.2%')}, N* ratio {_f(summary['holdout_nstar_ratio'], '.2f')}",
              f"- loss frontier L*(C) = E + k·C^γ with E from approach 3 on the same runs: "
              f"{_f(main['l_star_irreducible'])} + {_f(main['l_star_coef'], '.3g')}·C^{_f(main['l_exponent'])}",
              "", "## Compute-optimal models (approach 2, C = 6·N_total·D)", "",
              "| budget | N* | D* | tokens/param | L* | interior |", "|---|---|---|---|---|---|"]
    for key, b in sorted(summary["budgets"].items(), key=lambda kv: float(kv[0])):
        lines.append(f"| {key} | {b['n_star']:,.0f} | {b['d_star']:,.0f} | {b['tokens_per_param']:.1f} | "
                     f"{b['l_star']:.4f} | {b['interior']} |")
    lines += ["", "## Exponents by approach and FLOP convention (N* ∝ C^a, D* ∝ C^b; 90% bootstrap CI)", "",
              "| convention | approach 1 a | approach 2 a [CI] | approach 2 b | approach 3 a "
              "| approach 3 E, A, B, α, β | starts converged / at best |", "|---|---|---|---|---|---|---|"]
    for conv, ap in summary["approaches"].items():
        a2 = ap["approach2"]
        a3 = ap.get("approach3")
        a3_cols = (f"{_f(a3['a'])} | {_f(a3['E'])}, {_f(a3['A'], '.3g')}, {_f(a3['B'], '.3g')}, {_f(a3['alpha'])}, "
                   f"{_f(a3['beta'])} | "
                   f"{a3['n_converged']}/{a3['n_starts']}, {a3['n_at_best']}") if a3 else "– | – | –"
        lines.append(f"| {conv} | {_f(ap['approach1']['a'])} | {_f(a2['a'])} [{_f(a2['ci90']['a'][0])}, "
                     f"{_f(a2['ci90']['a'][1])}] | {_f(a2['b'])} | {a3_cols} |")
    lines += ["", "Approach 3 held-out error (fit without the largest budget, mean |ΔL|/L on its runs): " + ", ".join(
        f"{conv} {_f(v['heldout_loss_rel_err'], '.2%')}" for conv, v in summary["approach3"].items()),
        "", "Plots: isoflop.png, optimal_scaling.png, frontier.png, approach3.png", "", "## Runs", "",
        "| kind | budget | width | N_total | tokens | lr | final loss | status | wall s |",
        "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["spec"]["kind"], r["spec"]["budget"], r["spec"]["width"],
                                            r["spec"]["peak_lr"])):
        s = r["spec"]
        loss = f"{r['final_loss']:.4f}" if r["status"] == "ok" else r["error"][:60]
        lines.append(f"| {s['kind']} | {s['budget']:.0e} | {s['width']} | {r.get('n_total', '')} | "
                     f"{s['steps'] * s['batch_size'] * s['block_size']:,} | {s['peak_lr']:.2e} | {loss} | "
                     f"{r['status']} | {r['run_wall_s']:.0f} |")
    return "\n".join(lines) + "\n"
