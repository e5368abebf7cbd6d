"""Sweep planning: which model sizes to train at which compute budgets, with what schedule, and how long it takes.

A sweep is IsoFLOP (Chinchilla approach 2): at every budget C, models of several sizes are each trained for exactly
C FLOPs, so their final losses trace a curve in N whose minimum is the compute-optimal size N*(C). The sizes are
centred on a prior N*(C) = sqrt(C / (6·r)) (r tokens per parameter; Chinchilla's r ≈ 20) and span ¼×–4× of it, so a
prior that is wrong by 2–3× still leaves the minimum inside the span.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np

from llmjax.config import ModelConfig
from llmjax.errors import UserError
from llmjax.scaling import accounting

EVAL_FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


@dataclass(frozen=True)
class SweepConfig:
    """Everything that defines a sweep; a tier of `experiments/scaling_laws.py` is one of these."""

    budgets: tuple[float, ...]  # compute budgets C, FLOPs under `convention`
    widths: tuple[int, ...]  # the size grid: model widths d at fixed depth
    depth: int = 2
    sizes_per_budget: int = 6
    block_size: int = 64
    batch_size: int = 16
    vocab_size: int = 256
    head_dim: int = 16  # heads = d // head_dim (at least 1, and dividing d)
    prior_tokens_per_param: float = 20.0
    span: float = 4.0  # sizes run from N*/span to N*·span
    convention: str = "chinchilla"  # the convention budgets (and run lengths) are counted in
    data: str = "pystdlib"
    tokenizer: str = "byte"
    seed: int = 0
    chunk_steps: int = 8  # optimizer steps per compiled lax.scan chunk; run lengths are multiples of it
    eval_batches: int = 8
    eval_fractions: tuple[float, ...] = EVAL_FRACTIONS
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta2: float = 0.95
    # Learning-rate calibration: at `calib_budget`, `calib_sizes` widths spanning the smallest budget's sizes, each
    # at the prior lr times each of `calib_lr_factors`; lr* ∝ N^-γ is fitted to the per-size optima.
    calib_budget: float = 1e11
    calib_sizes: int = 3
    calib_lr_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    prior_lr: float = 6e-3  # at prior_lr_n parameters
    prior_lr_n: float = 3e4
    prior_lr_gamma: float = 0.35

    def validate(self) -> SweepConfig:
        if not self.budgets or any(c <= 0 for c in self.budgets) or list(self.budgets) != sorted(set(self.budgets)):
            raise UserError(f"budgets={self.budgets} must be positive and strictly increasing: fix --budgets")
        if len(self.widths) < self.sizes_per_budget or list(self.widths) != sorted(set(self.widths)):
            raise UserError(
                f"widths={self.widths} must be strictly increasing with at least sizes_per_budget="
                f"{self.sizes_per_budget} entries: add widths or lower --sizes_per_budget"
            )
        if self.sizes_per_budget < 3:
            raise UserError(f"sizes_per_budget={self.sizes_per_budget}: a parabola needs at least 3 sizes")
        if self.convention not in accounting.CONVENTIONS:
            raise UserError(f"convention={self.convention!r} is not one of {', '.join(accounting.CONVENTIONS)}")
        if self.span <= 1 or self.prior_tokens_per_param <= 0 or self.prior_lr <= 0:
            raise UserError("span must be > 1 and prior_tokens_per_param, prior_lr > 0")
        if not self.eval_fractions or self.eval_fractions[-1] != 1.0 or any(
            not 0 < f <= 1 for f in self.eval_fractions
        ):
            raise UserError(f"eval_fractions={self.eval_fractions} must lie in (0, 1] and end with 1.0")
        if self.calib_sizes < 2 or len(self.calib_lr_factors) < 3:
            raise UserError("the lr calibration needs at least 2 sizes and 3 lr factors")
        for w in self.widths:
            self.model_config(w).validate()
        return self

    def n_head(self, width: int) -> int:
        """The most heads of about `head_dim` that divide `width` (one head for the narrowest models)."""
        return next(h for h in range(max(1, width // self.head_dim), 0, -1) if width % h == 0)

    def model_config(self, width: int) -> ModelConfig:
        return ModelConfig(
            vocab_size=self.vocab_size, block_size=self.block_size, n_layer=self.depth, n_head=self.n_head(width),
            n_embd=width,
        )

    def n_total(self, width: int) -> int:
        return accounting.param_counts(self.model_config(width)).total

    def prior_n_star(self, budget: float) -> float:
        """The prior compute-optimal size: C = 6·N·D with D = r·N."""
        return math.sqrt(budget / (6.0 * self.prior_tokens_per_param))

    def prior_lr_for(self, n_total: float) -> float:
        return self.prior_lr * (n_total / self.prior_lr_n) ** -self.prior_lr_gamma


@dataclass(frozen=True)
class RunSpec:
    """One training run, fully resolved: its hash identifies its result, so equal specs are never trained twice."""

    kind: str  # sweep | lr_calibration
    budget: float  # the nominal budget of its IsoFLOP group
    width: int
    n_head: int
    depth: int
    block_size: int
    batch_size: int
    vocab_size: int
    steps: int
    peak_lr: float
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    beta2: float
    seed: int
    chunk_steps: int
    eval_batches: int
    eval_fractions: tuple[float, ...]
    data: str
    tokenizer: str

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            vocab_size=self.vocab_size, block_size=self.block_size, n_layer=self.depth, n_head=self.n_head,
            n_embd=self.width,
        )

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.block_size

    def eval_steps(self) -> tuple[int, ...]:
        """The chunk boundaries nearest to each eval fraction (deduplicated, always including the last step)."""
        k = self.chunk_steps
        return tuple(sorted({max(k, k * round(f * self.steps / k)) for f in self.eval_fractions}))

    def flops(self, convention: str) -> float:
        return accounting.flops_per_token(self.model_config(), convention) * self.tokens

    def run_hash(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def select_widths(sweep: SweepConfig, budget: float) -> tuple[int, ...]:
    """`sizes_per_budget` widths whose sizes are nearest (in log N) to a log-spaced span around the prior N*.

    If the span runs off the grid, it slides back inside it, so every budget still gets the full count of sizes.
    """
    log_n = np.log([sweep.n_total(w) for w in sweep.widths])
    half = math.log(sweep.span)
    centre = math.log(sweep.prior_n_star(budget))
    centre = min(max(centre, log_n[0] + half), log_n[-1] - half)
    targets = centre + np.linspace(-half, half, sweep.sizes_per_budget)
    chosen: list[int] = []
    for j, target in enumerate(targets):
        # increasing indices, leaving room on the grid for the sizes still to place
        allowed = range(chosen[-1] + 1 if chosen else 0, len(log_n) - (sweep.sizes_per_budget - j - 1))
        chosen.append(min(allowed, key=lambda i: abs(log_n[i] - target)))
    return tuple(sweep.widths[i] for i in chosen)


def make_run(sweep: SweepConfig, kind: str, budget: float, width: int, peak_lr: float) -> RunSpec:
    """A run of `width` trained for `budget` FLOPs: warmup max(10 steps, N tokens) (at most half the run), then a
    cosine decay that ends exactly at the last step."""
    cfg = sweep.model_config(width)
    tokens_per_step = sweep.batch_size * sweep.block_size
    ideal_steps = budget / (accounting.flops_per_token(cfg, sweep.convention) * tokens_per_step)
    k = sweep.chunk_steps
    steps = max(2 * k, k * round(ideal_steps / k))
    n_total = accounting.param_counts(cfg).total
    warmup = min(max(10, math.ceil(n_total / tokens_per_step)), steps // 2)
    return RunSpec(
        kind=kind, budget=budget, width=width, n_head=cfg.n_head, depth=sweep.depth, block_size=sweep.block_size,
        batch_size=sweep.batch_size, vocab_size=sweep.vocab_size, steps=steps, peak_lr=float(f"{peak_lr:.4g}"),
        warmup_steps=warmup, min_lr_ratio=sweep.min_lr_ratio, weight_decay=sweep.weight_decay, beta2=sweep.beta2,
        seed=sweep.seed, chunk_steps=k, eval_batches=sweep.eval_batches, eval_fractions=sweep.eval_fractions,
        data=sweep.data, tokenizer=sweep.tokenizer,
    )


def calibration_widths(sweep: SweepConfig) -> tuple[int, ...]:
    """`calib_sizes` widths spread evenly (in log N) over the sizes of the smallest budget."""
    widths = select_widths(sweep, sweep.budgets[0])
    picks = np.unique(np.round(np.linspace(0, len(widths) - 1, sweep.calib_sizes)).astype(int))
    return tuple(widths[i] for i in picks)


def plan_calibration(sweep: SweepConfig) -> list[RunSpec]:
    return [
        make_run(sweep, "lr_calibration", sweep.calib_budget, w, sweep.prior_lr_for(sweep.n_total(w)) * f)
        for w in calibration_widths(sweep)
        for f in sweep.calib_lr_factors
    ]


@dataclass(frozen=True)
class LrLaw:
    """lr*(N) = lr_ref · (N / n_ref)^-gamma, N the total parameter count."""

    lr_ref: float
    n_ref: float
    gamma: float

    def __call__(self, n_total: float) -> float:
        return self.lr_ref * (n_total / self.n_ref) ** -self.gamma


def prior_lr_law(sweep: SweepConfig) -> LrLaw:
    return LrLaw(sweep.prior_lr, sweep.prior_lr_n, sweep.prior_lr_gamma)


def plan_sweep(sweep: SweepConfig, lr_law: LrLaw) -> list[RunSpec]:
    """The IsoFLOP runs, smallest budget first, each size at its calibrated learning rate."""
    return [
        make_run(sweep, "sweep", c, w, lr_law(sweep.n_total(w)))
        for c in sweep.budgets
        for w in select_widths(sweep, c)
    ]


@dataclass(frozen=True)
class Throughput:
    """Measured cost of training on this machine: seconds per step = step_overhead_s + s_per_flop · FLOPs per step
    (FLOPs with attention), plus one compile per distinct width."""

    step_overhead_s: float
    s_per_flop: float
    compile_s: float

    def run_seconds(self, spec: RunSpec) -> float:
        """Training steps plus the forward-only evaluations (a forward pass costs about a third of a step)."""
        flops_step = spec.flops("attention") / spec.steps
        step_s = self.step_overhead_s + self.s_per_flop * flops_step
        eval_s = len(spec.eval_steps()) * spec.eval_batches * (self.step_overhead_s + self.s_per_flop * flops_step / 3)
        return spec.steps * step_s + eval_s


def fit_throughput(flops_per_step: list[float], seconds_per_step: list[float], compile_s: float) -> Throughput:
    """Least-squares line through the measured (FLOPs per step, seconds per step) points, clamped non-negative."""
    slope, intercept = np.polyfit(np.asarray(flops_per_step), np.asarray(seconds_per_step), 1)
    if slope <= 0:  # noisy measurements on a loaded machine: fall back to the mean rate
        slope, intercept = float(np.sum(seconds_per_step) / np.sum(flops_per_step)), 0.0
    return Throughput(step_overhead_s=max(float(intercept), 0.0), s_per_flop=float(slope), compile_s=compile_s)


def dry_run_table(specs: list[RunSpec], throughput: Throughput | None, convention: str) -> tuple[str, float]:
    """A printable table of the runs (FLOPs, tokens, steps, estimated seconds) and the estimated total seconds."""
    lines = [f"{'kind':<15}{'budget':>9}{'width':>7}{'N_total':>13}{'tokens':>17}{'steps':>8}{'lr':>10}"
             f"{'C(' + convention + ')':>16}{'est_s':>9}"]
    total = 0.0
    for s in specs:
        est = throughput.run_seconds(s) if throughput else float("nan")
        total += est
        n = accounting.param_counts(s.model_config()).total
        lines.append(f"{s.kind:<15}{s.budget:>9.1e}{s.width:>7}{n:>13,}{s.tokens:>17,}{s.steps:>8}{s.peak_lr:>10.2e}"
                     f"{s.flops(convention):>16.3e}{est:>9.1f}")
    if throughput:
        n_compiles = len({s.width for s in specs})
        total += n_compiles * throughput.compile_s
        lines.append(f"{n_compiles} distinct widths × {throughput.compile_s:.1f}s compile; "
                     f"estimated total {total:.0f}s ({total / 60:.1f} min)")
    return "\n".join(lines), total
