"""The three Chinchilla estimators of compute-optimal scaling, on plain arrays (one entry per run or curve point).

- Approach 1: the envelope of the loss-vs-FLOPs curves of all runs; the model size on the envelope at each C.
- Approach 2: per IsoFLOP budget a parabola of loss in log N (weighted by training tokens, see `fit_isoflop`); its
  vertex is N*(C); power laws through the vertices
  for N*(C) and D*(C), and for L*(C) a power law above an irreducible loss E (see `LossFrontier`).
- Approach 3: L(N, D) = E + A/N^α + B/D^β, fitted with a Huber loss on log L by L-BFGS from a grid of starts
  (all starts advance together, vectorised);
  with C = 6·N·D its optimum is closed-form: N_opt = G·(C/6)^(β/(α+β)), D_opt = G^-1·(C/6)^(α/(α+β)),
  G = (αA / (βB))^(1/(α+β)).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Runs:
    """Finished runs as parallel arrays: IsoFLOP group (nominal budget), N, tokens D, FLOPs C, final loss."""

    group: np.ndarray
    n: np.ndarray
    d: np.ndarray
    c: np.ndarray
    loss: np.ndarray

    def take(self, mask: np.ndarray) -> Runs:
        return Runs(self.group[mask], self.n[mask], self.d[mask], self.c[mask], self.loss[mask])


# ---------------------------------------------------------------------------------------------------- power laws


@dataclass(frozen=True)
class PowerLaw:
    """y = coef · x^exponent, fitted by least squares in log-log."""

    coef: float
    exponent: float

    def __call__(self, x: float | np.ndarray) -> float | np.ndarray:
        return self.coef * np.asarray(x) ** self.exponent


NAN_LAW = PowerLaw(coef=math.nan, exponent=math.nan)


def fit_power_law(x: np.ndarray, y: np.ndarray) -> PowerLaw:
    """NaN coefficients if some y is not positive (no power law passes through it)."""
    if not np.all(y > 0):
        return NAN_LAW
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return PowerLaw(coef=float(np.exp(intercept)), exponent=float(slope))


@dataclass(frozen=True)
class LossFrontier:
    """L*(C) = E + coef·C^exponent: the compute-optimal loss as a power law above the irreducible loss E.

    Under L(N, D) = E + A/N^α + B/D^β the optimal loss is exactly E + K·C^(−αβ/(α+β)), so L* bends towards E and a
    straight line in log L* (E = 0) extrapolates too low. Three or four IsoFLOP vertices cannot pin E down, so E is
    given: approach 3's E, fitted to the same runs. If E is not below every L*, the law falls back to E = 0.
    """

    irreducible: float
    law: PowerLaw

    @property
    def coef(self) -> float:
        return self.law.coef

    @property
    def exponent(self) -> float:
        return self.law.exponent

    def __call__(self, c: float | np.ndarray) -> float | np.ndarray:
        return self.irreducible + self.law(c)


def fit_loss_frontier(c: np.ndarray, l_star: np.ndarray, irreducible: float = 0.0) -> LossFrontier:
    e = irreducible if math.isfinite(irreducible) and 0.0 <= irreducible < np.min(l_star) else 0.0
    return LossFrontier(irreducible=float(e), law=fit_power_law(c, l_star - e))


# ---------------------------------------------------------------------------------------------------- approach 2


@dataclass(frozen=True)
class IsoFlopFit:
    """One budget's parabola L = p2·u² + p1·u + p0 in u = log N, and its vertex."""

    group: float
    coeffs: tuple[float, float, float]  # p2, p1, p0
    n_star: float
    d_star: float
    c_star: float
    l_star: float
    left: int  # runs with N below the vertex
    right: int
    interior: bool  # positive curvature and at least two runs on each side of the vertex

    @property
    def bracketed(self) -> bool:
        """Positive curvature and a vertex among the sizes run: a minimum seen, not extrapolated."""
        return self.coeffs[0] > 0 and self.left >= 1 and self.right >= 1

    @property
    def degenerate(self) -> str | None:
        """Why this vertex is not an observed, well-supported minimum (None: it is)."""
        if self.coeffs[0] <= 0:
            return "no interior minimum: the IsoFLOP curve is not convex, N* is the best run"
        if not self.bracketed:
            return f"vertex outside the sizes run ({self.left} runs below it, {self.right} above): extrapolated"
        if not self.interior:
            return f"vertex at the edge of the sizes run ({self.left} below it, {self.right} above; needs 2 each side)"
        return None


def fit_isoflop(runs: Runs, group: float) -> IsoFlopFit:
    """The vertex of the parabola through one budget's runs; D* and C* interpolated log-linearly in log N there.

    Weighted least squares with weight ∝ D (tokens trained; ∝ optimizer steps at a fixed batch): a short run's final
    loss is far noisier than a long one's (replicated cpu-tier runs differ by 0.1 nats rms under 1,000 steps, by
    0.01–0.02 above), so its noise variance is taken ∝ 1/D. Within a budget D ∝ 1/N, so the largest models count
    least.
    """
    sel = runs.take(runs.group == group)
    u = np.log(sel.n)
    p2, p1, p0 = np.polyfit(u, sel.loss, 2, w=np.sqrt(sel.d / sel.d.max()))  # polyfit's w is 1/σ
    # Without positive curvature there is no minimum: take the best run as the (edge) estimate.
    u_star = -p1 / (2 * p2) if p2 > 0 else float(u[np.argmin(sel.loss)])
    l_star = float(np.polyval([p2, p1, p0], u_star))
    d_line = np.polyfit(u, np.log(sel.d), 1)
    c_line = np.polyfit(u, np.log(sel.c), 1)
    left, right = int(np.sum(u < u_star)), int(np.sum(u > u_star))
    return IsoFlopFit(
        group=float(group), coeffs=(float(p2), float(p1), float(p0)), n_star=float(np.exp(u_star)),
        d_star=float(np.exp(np.polyval(d_line, u_star))), c_star=float(np.exp(np.polyval(c_line, u_star))),
        l_star=l_star, left=left, right=right, interior=bool(p2 > 0 and left >= 2 and right >= 2),
    )


@dataclass(frozen=True)
class Approach2:
    fits: tuple[IsoFlopFit, ...]
    n_star: PowerLaw  # N*(C)
    d_star: PowerLaw  # D*(C)
    l_star: LossFrontier  # L*(C)

    @property
    def degenerate(self) -> str | None:
        """Why these power laws say nothing about scaling (None: they do)."""
        if len(self.fits) < 2:
            return f"{len(self.fits)} budget(s) with three or more finished runs; power laws need two"
        outside = [f"{f.group:.0e}" for f in self.fits if not f.bracketed]
        if len(self.fits) - len(outside) < 2:
            return f"no interior minimum (no convex IsoFLOP curve with runs on both sides of its vertex) at " \
                   f"budgets {', '.join(outside)}"
        if not all(math.isfinite(x) for x in (self.n_star.exponent, self.d_star.exponent, self.l_star.exponent)):
            return "a vertex with L* at or below zero: no power law through the vertices"
        return None



def approach2(runs: Runs, irreducible: float = 0.0) -> Approach2:
    """Parabola per budget, then power laws of the vertices against the compute at the vertex; L*(C) above the
    irreducible loss `irreducible` (E of approach 3 on the same runs; 0: a plain power law).

    Budgets with fewer than three finished runs (no parabola) are left out; with fewer than two budgets left the
    laws are NaN and the fit says so in `degenerate`.
    """
    groups, counts = np.unique(runs.group, return_counts=True)
    fits = tuple(fit_isoflop(runs, g) for g in groups[counts >= 3])
    if len(fits) < 2:
        return Approach2(fits=fits, n_star=NAN_LAW, d_star=NAN_LAW, l_star=LossFrontier(math.nan, NAN_LAW))
    c = np.array([f.c_star for f in fits])
    return Approach2(
        fits=fits,
        n_star=fit_power_law(c, np.array([f.n_star for f in fits])),
        d_star=fit_power_law(c, np.array([f.d_star for f in fits])),
        l_star=fit_loss_frontier(c, np.array([f.l_star for f in fits]), irreducible),
    )


def leave_one_budget_out(runs: Runs) -> list[float]:
    """The exponent a of N*(C) refitted without each budget in turn (needs at least three budgets)."""
    groups = np.unique(runs.group)
    return [approach2(runs.take(runs.group != g)).n_star.exponent for g in groups] if len(groups) >= 3 else []


def holdout(runs: Runs, irreducible: float = 0.0) -> dict[str, float]:
    """Fit on every budget but the largest, predict N* and L* at the largest budget's compute, compare.

    `irreducible` must come from the smaller budgets only (approach 3 fitted without the largest), or the
    prediction would see the answer.
    """
    groups = np.unique(runs.group)
    target = fit_isoflop(runs, groups[-1])
    train = approach2(runs.take(runs.group != groups[-1]), irreducible)
    n_pred, l_pred = float(train.n_star(target.c_star)), float(train.l_star(target.c_star))
    return {
        "n_star_pred": n_pred, "n_star_fit": target.n_star, "l_star_pred": l_pred, "l_star_fit": target.l_star,
        "irreducible": train.l_star.irreducible,
        "loss_rel_err": abs(l_pred - target.l_star) / target.l_star,
        "nstar_ratio": max(n_pred / target.n_star, target.n_star / n_pred),
    }


def bootstrap_approach2(runs: Runs, n_boot: int = 200, seed: int = 0, level: float = 0.9,
                        irreducible: float = 0.0) -> dict[str, list[float]]:
    """Percentile intervals of the N*(C), D*(C), L*(C) exponents, resampling runs within each budget (E held fixed).

    Resamples with fewer than three distinct sizes in some budget (no parabola) are skipped.
    """
    rng = np.random.default_rng(seed)
    groups = np.unique(runs.group)
    index = [np.flatnonzero(runs.group == g) for g in groups]
    samples: dict[str, list[float]] = {"a": [], "b": [], "l": []}
    for _ in range(n_boot if len(groups) >= 2 else 0):
        picks = [rng.choice(ix, size=len(ix), replace=True) for ix in index]
        if any(len(np.unique(runs.n[p])) < 3 for p in picks):
            continue
        with np.errstate(invalid="ignore"):  # a resampled parabola can put L* at or below zero: no power law
            fit = approach2(runs.take(np.concatenate(picks)), irreducible)
        exponents = (fit.n_star.exponent, fit.d_star.exponent, fit.l_star.exponent)
        # a resample with some L* at or below E has no frontier of this form: skipped, not refitted with E = 0
        if all(np.isfinite(exponents)) and fit.l_star.irreducible == irreducible:
            for key, value in zip("abl", exponents, strict=True):
                samples[key].append(value)
    lo, hi = 50 * (1 - level), 50 * (1 + level)
    return {k: [float(np.percentile(v, lo)), float(np.percentile(v, hi))] if v else [math.nan, math.nan]
            for k, v in samples.items()}


# ---------------------------------------------------------------------------------------------------- approach 1


@dataclass(frozen=True)
class Approach1:
    c: np.ndarray  # envelope points: FLOPs, the size and tokens of the run that is best there, its loss
    n: np.ndarray
    d: np.ndarray
    loss: np.ndarray
    n_star: PowerLaw | None
    d_star: PowerLaw | None

    @property
    def degenerate(self) -> str | None:
        if not len(self.c):
            return "no loss curves"
        if self.n_star is None:
            return "fewer than two sizes between the smallest and largest win the envelope"
        return None


def approach1(c: np.ndarray, n: np.ndarray, d: np.ndarray, loss: np.ndarray, n_bins: int = 12) -> Approach1:
    """The lowest loss in each of `n_bins` log-spaced FLOP bins, over every point of every run's loss curve.

    Envelope points won by the smallest or largest model of the sweep are dropped from the power-law fit: there the
    envelope is pinned by the edge of the size grid, not by an optimum.
    """
    if not len(c):
        return Approach1(c=c, n=n, d=d, loss=loss, n_star=None, d_star=None)
    edges = np.linspace(np.log(c.min()), np.log(c.max()) + 1e-9, n_bins + 1)
    bins = np.digitize(np.log(c), edges) - 1
    best = [np.flatnonzero(bins == b)[np.argmin(loss[bins == b])] for b in range(n_bins) if np.any(bins == b)]
    best = np.array(best)
    inner = best[(n[best] > n.min()) & (n[best] < n.max())]
    fit_ok = len(np.unique(n[inner])) >= 2
    return Approach1(
        c=c[best], n=n[best], d=d[best], loss=loss[best],
        n_star=fit_power_law(c[inner], n[inner]) if fit_ok else None,
        d_star=fit_power_law(c[inner], d[inner]) if fit_ok else None,
    )


# ---------------------------------------------------------------------------------------------------- approach 3


N_PARAMS = 5  # θ = (log E, log A, log B, α, β)


@dataclass(frozen=True)
class Approach3:
    """L(N, D) = E + A/N^α + B/D^β and how the multi-start L-BFGS went.

    The fit is kept as the optimizer left it, in θ = (log E, log A, log B, α, β): a log-parameter that ran off to
    −1000 is a finite θ whose exp is 0.0, and the bootstrap restarts from θ, not from log(exp(θ)).
    """

    theta: tuple[float, float, float, float, float]
    objective: float
    n_starts: int
    n_converged: int  # starts whose L-BFGS reported convergence
    n_at_best: int  # converged starts that reached the best objective (within 1e-6 relative)
    n_runs: int

    @property
    def E(self) -> float:
        return float(np.exp(self.theta[0]))

    @property
    def A(self) -> float:
        return float(np.exp(self.theta[1]))

    @property
    def B(self) -> float:
        return float(np.exp(self.theta[2]))

    @property
    def alpha(self) -> float:
        return self.theta[3]

    @property
    def beta(self) -> float:
        return self.theta[4]

    @property
    def a(self) -> float:
        """The exponent of N_opt(C) = β/(α+β); NaN without positive exponents."""
        return self.beta / (self.alpha + self.beta) if self.alpha > 0 and self.beta > 0 else math.nan

    @property
    def degenerate(self) -> str | None:
        """Why this fit is not a scaling law of the assumed form (None: it is)."""
        if self.n_runs < N_PARAMS:
            return f"{self.n_runs} runs for {N_PARAMS} parameters"
        if not self.n_converged:
            return f"none of {self.n_starts} L-BFGS starts converged"
        # Losses are O(1) nats: an E below 1e-6 nats is E → 0 (no irreducible loss resolved); an A or B beyond
        # e^±69 = 1e±30 is not bounded by the data (its term is zero or the optimizer diverged).
        for name, log_value, low, high in (("E", self.theta[0], math.log(1e-6), 69.0),
                                           ("A", self.theta[1], -69.0, 69.0), ("B", self.theta[2], -69.0, 69.0)):
            if not low < log_value < high:
                return f"{name} ran off to {'0' if log_value <= low else '∞'} (log {name} = {log_value:.3g})"
        if not (self.alpha > 1e-6 and self.beta > 1e-6):
            return f"an exponent at or below zero (α = {self.alpha:.3g}, β = {self.beta:.3g}): loss does not fall " \
                   "with scale"
        return None

    def loss(self, n: np.ndarray, d: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return self.E + self.A / np.asarray(n) ** self.alpha + self.B / np.asarray(d) ** self.beta

    def optimal(self, c: float | np.ndarray, flops_per_param_token: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
        """Closed-form (N_opt, D_opt) at compute C = k·N·D (k = 6); NaN if an exponent is not positive.

        Computed from θ in log space, so an A or B that underflowed to 0 still gives the optimum θ implies.
        """
        if not (self.alpha > 0 and self.beta > 0):
            nan = np.full(np.shape(c), np.nan)
            return nan, nan
        _, log_a, log_b, alpha, beta = self.theta
        log_g = (math.log(alpha) + log_a - math.log(beta) - log_b) / (alpha + beta)
        log_s = np.log(np.asarray(c, float) / flops_per_param_token)
        with np.errstate(over="ignore"):
            return np.exp(log_g + log_s * beta / (alpha + beta)), np.exp(log_s * alpha / (alpha + beta) - log_g)


DEFAULT_GRID = {
    "e": (-1.0, 0.0, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0),
    "alpha": (0.0, 0.5, 1.0, 1.5),
    "beta": (0.0, 0.5, 1.0, 1.5),
}


def _huber_objective(theta_S5: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
                     delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Per start s: Σ_runs Huber_δ(LSE(a − α·log N, b − β·log D, e) − log L) and its gradient in θ = (e, a, b, α, β).

    Vectorised over S starts at once: thousands of L-BFGS starts cost about as much as one.
    """
    e, a, b, alpha, beta = (theta_S5[:, i : i + 1] for i in range(5))
    with np.errstate(over="ignore", invalid="ignore"):
        value_S, grad_S5 = _huber_terms(e, a, b, alpha, beta, log_n, log_d, log_l, delta)
    # Negative exponents make L grow with scale: outside the model, so such points are rejected by the line search.
    outside = ((alpha < 0) | (beta < 0))[:, 0] | ~np.isfinite(value_S)
    value_S[outside] = np.inf
    return value_S, grad_S5


def _huber_terms(e: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: np.ndarray, beta: np.ndarray,
                 log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float) -> tuple[np.ndarray, ...]:
    terms_3SR = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(e), len(log_n)))])
    top_SR = terms_3SR.max(axis=0)
    exp_3SR = np.exp(terms_3SR - top_SR)
    total_SR = exp_3SR.sum(axis=0)
    r_SR = top_SR + np.log(total_SR) - log_l
    abs_r = np.abs(r_SR)
    value_S = np.where(abs_r <= delta, 0.5 * r_SR**2, delta * (abs_r - 0.5 * delta)).sum(axis=1)
    w_3SR = exp_3SR / total_SR * np.clip(r_SR, -delta, delta)  # softmax × Huber': d loss / d terms
    grad_S5 = np.stack([w_3SR[2].sum(1), w_3SR[0].sum(1), w_3SR[1].sum(1), -(w_3SR[0] * log_n).sum(1),
                        -(w_3SR[1] * log_d).sum(1)], axis=1)
    return value_S, grad_S5


def lbfgs_batched(fun: Callable, x_SP: np.ndarray, memory: int = 10, max_iter: int = 500, ftol: float = 1e-10,
                  max_halvings: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimise independently from each of S starts with L-BFGS (two-loop recursion, backtracking Armijo search).

    `fun(x_SP) -> (f_S, g_SP)`. A start stops when its relative decrease falls below `ftol` or no step along its
    search direction decreases f (it sits at a minimum to float precision); it has converged if it stopped before
    `max_iter`. Only the starts still running are evaluated. Returns (x_SP, f_S, converged_S).
    """
    x_SP = np.array(x_SP, float)
    S, P = x_SP.shape
    f, g = fun(x_SP)
    s_hist, y_hist, rho_hist = np.zeros((memory, S, P)), np.zeros((memory, S, P)), np.zeros((memory, S))
    converged = np.zeros(S, bool)
    live = np.flatnonzero(np.isfinite(f))
    for it in range(max_iter):
        if not len(live):
            break
        x, fx, gx = x_SP[live], f[live], g[live]
        order = [(it - 1 - k) % memory for k in range(min(it, memory))]  # newest first
        q, alphas = gx.copy(), []
        for k in order:
            alpha_k = rho_hist[k, live] * np.sum(s_hist[k, live] * q, axis=1)
            q -= alpha_k[:, None] * y_hist[k, live]
            alphas.append(alpha_k)
        if order:
            sk, yk = s_hist[order[0], live], y_hist[order[0], live]
            sy, yy = np.sum(sk * yk, axis=1), np.sum(yk * yk, axis=1)
            scale = np.where((sy > 0) & (yy > 0), sy / np.where(yy > 0, yy, 1.0), 1.0)
        else:
            scale = 1.0 / np.maximum(np.linalg.norm(gx, axis=1), 1e-300)  # first step of unit length
        r = q * np.reshape(scale, (-1, 1))
        for k, alpha_k in zip(reversed(order), reversed(alphas), strict=True):
            r += s_hist[k, live] * (alpha_k - rho_hist[k, live] * np.sum(y_hist[k, live] * r, axis=1))[:, None]
        direction = -r
        slope = np.sum(gx * direction, axis=1)
        uphill = ~(slope < 0)  # not a descent direction: fall back to steepest descent
        direction[uphill] = -gx[uphill]
        slope[uphill] = -np.sum(gx[uphill] ** 2, axis=1)
        step = np.ones(len(live))
        accepted = np.zeros(len(live), bool)
        x_new, f_new, g_new = x.copy(), fx.copy(), gx.copy()
        for _ in range(max_halvings):
            todo = np.flatnonzero(~accepted)
            trial = x[todo] + step[todo, None] * direction[todo]
            f_t, g_t = fun(trial)
            ok = np.isfinite(f_t) & (f_t <= fx[todo] + 1e-4 * step[todo] * slope[todo]) & (f_t < fx[todo])
            x_new[todo[ok]], f_new[todo[ok]], g_new[todo[ok]] = trial[ok], f_t[ok], g_t[ok]
            accepted[todo[ok]] = True
            step[todo[~ok]] *= 0.5
            if accepted.all():
                break
        done = ~accepted | (fx - f_new <= ftol * np.maximum(np.abs(fx), 1e-300))
        slot = it % memory
        s_new, y_new = x_new - x, g_new - gx
        sy = np.sum(s_new * y_new, axis=1)
        s_hist[slot, live], y_hist[slot, live] = s_new, y_new
        rho_hist[slot, live] = np.where(sy > 0, 1.0 / np.where(sy > 0, sy, 1.0), 0.0)  # 0: the pair is ignored
        x_SP[live], f[live], g[live] = x_new, f_new, g_new
        converged[live[done]] = True
        live = live[~done]
    return x_SP, f, converged


def approach3(n: np.ndarray, d: np.ndarray, loss: np.ndarray, grid: dict | None = None, delta: float = 1e-3,
              init: np.ndarray | None = None) -> Approach3:
    """Fit from every start of `grid` (or from `init` alone) and keep the lowest objective (Hoffmann et al. §D.2).

    With fewer runs than parameters nothing is fitted: θ is NaN and `degenerate` says why.
    """
    grid = grid or DEFAULT_GRID
    starts = np.array([init] if init is not None else list(itertools.product(*grid.values())), float)
    if len(n) < N_PARAMS:
        return Approach3(theta=(math.nan,) * N_PARAMS, objective=math.nan, n_starts=len(starts), n_converged=0,
                         n_at_best=0, n_runs=len(n))
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    x, f, converged = lbfgs_batched(lambda th: _huber_objective(th, log_n, log_d, log_l, delta), starts)
    best = int(np.argmin(f))
    at_best = converged & (f <= f[best] * (1 + 1e-6) + 1e-14)
    return Approach3(
        theta=tuple(float(v) for v in x[best]), objective=float(f[best]), n_starts=len(starts),
        n_converged=int(converged.sum()), n_at_best=int(at_best.sum()), n_runs=len(n),
    )


def bootstrap_approach3(n: np.ndarray, d: np.ndarray, loss: np.ndarray, fit: Approach3, n_boot: int = 100,
                        seed: int = 0, level: float = 0.9) -> dict[str, list[float]]:
    """Percentile intervals of (E, A, B, α, β, a = β/(α+β)), resampling runs, each refit started from `fit`'s θ.

    Resamples whose refit gives a non-finite value are left out of that value's interval.
    """
    rng = np.random.default_rng(seed)
    keys = ("E", "A", "B", "alpha", "beta", "a")
    samples: dict[str, list[float]] = {k: [] for k in keys}
    if fit.n_runs >= N_PARAMS and all(math.isfinite(v) for v in fit.theta):
        for _ in range(n_boot):
            i = rng.integers(0, len(n), len(n))
            f = approach3(n[i], d[i], loss[i], init=np.array(fit.theta))
            for k in keys:
                samples[k].append(getattr(f, k))
    lo, hi = 50 * (1 - level), 50 * (1 + level)
    finite = {k: [x for x in v if math.isfinite(x)] for k, v in samples.items()}
    return {k: [float(np.percentile(v, lo)), float(np.percentile(v, hi))] if v else [math.nan, math.nan]
            for k, v in finite.items()}
