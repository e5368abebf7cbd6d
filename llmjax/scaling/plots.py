"""The sweep's figures (PNG, matplotlib Agg): IsoFLOP parabolas, N*/D* vs C, the loss frontier, approach-3 contours.

All in the Chinchilla convention (N = all parameters, C = 6·N·D), drawn from summary.json plus the run records.
"""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Record = dict[str, Any]


def write_all(workdir: str, summary: dict, records: list[Record]) -> list[str]:
    """Write the figures into `workdir`; returns their paths. A figure of a degenerate fit is not drawn (its line
    would be NaN or meaningless): report.md lists the reason."""
    conv = summary["approaches"]["chinchilla"]
    a2, a3 = conv["approach2"], conv["approach3"]
    paths = []
    if a2["budgets"]:
        paths.append(_isoflop(os.path.join(workdir, "isoflop.png"), a2, records))
    if not a2["degenerate"]:
        paths.append(_optimal(os.path.join(workdir, "optimal_scaling.png"), a2))
        paths.append(_frontier(os.path.join(workdir, "frontier.png"), conv, records))
    if not a3["degenerate"] and a2["budgets"]:
        paths.append(_approach3(os.path.join(workdir, "approach3.png"), a3, a2))
    plt.close("all")
    return paths


def _budgets(a2: dict) -> list[tuple[float, dict]]:
    return sorted(((float(k), v) for k, v in a2["budgets"].items()), key=lambda kv: kv[0])


def _isoflop(path: str, a2: dict, records: list[Record]) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(a2["budgets"])))
    for (budget, b), color in zip(_budgets(a2), colors, strict=True):
        runs = sorted((r["n_total"], r["final_loss"]) for r in records
                      if f"{r['spec']['budget']:.0e}" == f"{budget:.0e}")
        n, loss = np.array(runs).T
        ax.scatter(n, loss, color=color, label=f"C={budget:.0e}")
        u = np.linspace(np.log(n.min()), np.log(n.max()), 100)
        ax.plot(np.exp(u), np.polyval(b["coeffs"], u), color=color)
        ax.plot(b["n_star"], b["l_star"], "*", color=color, markersize=14, markeredgecolor="k")
    ax.set(xscale="log", xlabel="parameters N", ylabel="final validation loss (nats/token)",
           title="IsoFLOP curves: parabola in log N, minimum ★")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _optimal(path: str, a2: dict) -> str:
    budgets = _budgets(a2)
    c = np.array([b["c_star"] for _, b in budgets])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, coef, exp, name in ((axes[0], "n_star", a2["n_star_coef"], a2["a"], "N*"),
                                     (axes[1], "d_star", a2["d_star_coef"], a2["b"], "D*")):
        y = np.array([b[key] for _, b in budgets])
        grid = np.geomspace(c.min() / 2, c.max() * 2, 50)
        ax.scatter(c, y, color="k", zorder=3, label=f"{name} (approach 2)")
        ax.plot(grid, coef * grid**exp, label=f"fit: exponent {exp:.3f}")
        pivot_c, pivot_y = np.exp(np.mean(np.log(c))), np.exp(np.mean(np.log(y)))
        refs = {"Chinchilla 0.5": 0.5, "Kaplan 0.73": 0.73} if key == "n_star" else {"Chinchilla 0.5": 0.5,
                                                                                     "Kaplan 0.27": 0.27}
        for label, slope in refs.items():
            ax.plot(grid, pivot_y * (grid / pivot_c) ** slope, "--", label=label)
        ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel=name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _frontier(path: str, conv: dict, records: list[Record]) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in records:
        c = r["flops"]["chinchilla"] * np.array([p["fraction"] for p in r["curve"]])
        ax.plot(c, [p["val_loss"] for p in r["curve"]], color="0.75", linewidth=0.8)
    env = np.array(conv["approach1"]["envelope"])
    if len(env):
        ax.plot(env[:, 0], env[:, 3], "o", color="tab:orange", label="approach 1 envelope")
    a2 = conv["approach2"]
    budgets = _budgets(a2)
    c = np.array([b["c_star"] for _, b in budgets])
    ax.plot(c, [b["l_star"] for _, b in budgets], "*", color="k", markersize=12, label="approach 2 L*")
    grid = np.geomspace(c.min() / 2, c.max() * 2, 50)
    e = a2["l_star_irreducible"]
    ax.plot(grid, e + a2["l_star_coef"] * grid ** a2["l_exponent"],
            label=f"L* = {e:.2f} + {a2['l_star_coef']:.3g}·C^{a2['l_exponent']:.3f}")
    ax.set(xscale="log", xlabel="compute C (FLOPs)", ylabel="validation loss", title="loss frontier")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _approach3(path: str, a3: dict, a2: dict) -> str:
    budgets = _budgets(a2)
    c_grid = np.geomspace(budgets[0][0] / 3, budgets[-1][0] * 3, 120)
    n_grid = np.geomspace(min(b["n_star"] for _, b in budgets) / 8, max(b["n_star"] for _, b in budgets) * 8, 120)
    C, N = np.meshgrid(c_grid, n_grid)
    loss = a3["E"] + a3["A"] / N ** a3["alpha"] + a3["B"] / (C / (6 * N)) ** a3["beta"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    cs = ax.contour(C, N, loss, levels=15, cmap="viridis")
    ax.clabel(cs, fontsize=7)
    _, log_a, log_b = a3["log_EAB"]
    g = np.exp((np.log(a3["alpha"]) + log_a - np.log(a3["beta"]) - log_b) / (a3["alpha"] + a3["beta"]))
    ax.plot(c_grid, g * (c_grid / 6) ** a3["a"], "r-", label=f"approach 3 optimum, a={a3['a']:.3f}")
    ax.plot([b["c_star"] for _, b in budgets], [b["n_star"] for _, b in budgets], "k*", markersize=12,
            label="approach 2 N*")
    ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="parameters N",
           title=f"L(N, D) = {a3['E']:.2f} + {a3['A']:.3g}/N^{a3['alpha']:.2f} + {a3['B']:.3g}/D^{a3['beta']:.2f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
