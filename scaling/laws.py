"""Scaling-law fits and effective model size: pure numerics (numpy, scipy), no trainer.

Three laws, all over N = **non-embedding** parameters (Kaplan et al. 2020 count; embeddings
scale with the vocabulary, not with what the model can learn) and D = training tokens:

* Kaplan:      L(N)    = (N_c / N)^α_N
  fitted as the straight line log L = α_N log N_c - α_N log N (least squares in log space).
  It ignores D, so it describes runs trained on the same token budget (or to convergence).
* Chinchilla:  L(N, D) = E + A / N^α + B / D^β
  fitted as Hoffmann et al. (2022, app. D.2) do: with E = e^e, A = e^a, B = e^b, the
  predicted log loss is LSE(a - α log N, b - β log D, e), and the Huber loss (δ = 1e-3) of
  its difference to the observed log loss is minimised with L-BFGS from a grid of
  initialisations, keeping the best.
* Floor:       L(N)    = E + A / N^α
  Kaplan's power law above an irreducible floor E, for runs of one token budget: fitted
  like Chinchilla without the D term (Huber loss on log L of LSE(a - α log N, e), L-BFGS
  from a grid). It needs three model sizes; ``choose_error_law`` picks it for downstream
  errors (1 - accuracy), which do not fall to zero (ambiguous or mislabelled items).

The laws fit any positive quantity that falls with N like a loss: the validation loss, or
a few-shot score turned into one (``yoto.scaling.runs.ScoreMetric``: 1 - accuracy, the
log of a perplexity); ``Fit.quantity`` names it in the formula.

Intervals come from a bootstrap over points (resample the runs with replacement, refit);
they are percentile intervals of the refits. The **effective size** of a run inverts the
law at the run's loss (and its D): the N of a model that the law says reaches that loss on
that many tokens ("this 13B run performs like a 4.1B"). Under Chinchilla the loss can be
at or below the floor E + B/D^β that no finite model reaches on D tokens; then the
effective size is infinite and says so.

Compute on the charts' axes is the **approximation** C ≈ 6·N·D (``compute_6nd``: Kaplan et
al.'s 2 FLOPs per parameter and token forward, 4 backward, attention left out), the
convention scaling laws are plotted in. It is not the trainer's exact count of model FLOPs
(``yoto.trainer.flops.flops_per_token``: embeddings, LM head and attention included), and
is named so that the two are never taken for each other.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.optimize import minimize

from yoto.errors import YotoError

PARAMETER_COUNT = "non-embedding"  # what N means, stated in every output
HUBER_DELTA = 1e-3
Law = Literal["kaplan", "chinchilla", "floor"]
LAW_PARAMS: dict[str, tuple[str, ...]] = {
    "kaplan": ("N_c", "alpha_N"),
    "chinchilla": ("E", "A", "B", "alpha", "beta"),
    "floor": ("E", "A", "alpha"),
}
LAW_NAMES = {"kaplan": "Kaplan", "chinchilla": "Chinchilla", "floor": "Floor"}
FLOOR_MIN_POINTS = 8  # choose_error_law: the floor law from this many runs ...
FLOOR_MIN_SIZES = 4  # ... over at least this many model sizes


COMPUTE_6ND_LABEL = "approximate training compute C ≈ 6·N·D (FLOPs)"


class ScalingError(YotoError):
    """Input a fit cannot use: too few points, non-positive N or D, missing losses."""


@dataclass(frozen=True)
class Point:
    n: float  # non-embedding parameters
    d: float | None  # training tokens (None: unknown; only the Kaplan law then)
    loss: float  # validation loss, nats per token
    name: str = ""
    source: str = ""


@dataclass
class Interval:
    value: float
    low: float
    high: float

    def to_json(self) -> dict[str, float | str]:
        return {k: _json_float(getattr(self, k)) for k in ("value", "low", "high")}


@dataclass
class EffectiveSize:
    """The N at which the law predicts ``loss`` at ``d`` tokens, with a bootstrap interval.
    ``value`` is ``inf`` when the loss is at or below the law's floor for that D (no finite
    model gets there); ``infinite_fraction`` is the share of bootstrap fits where it was."""

    loss: float
    d: float | None
    value: float
    low: float
    high: float
    infinite_fraction: float = 0.0

    @property
    def finite(self) -> bool:
        return math.isfinite(self.value)

    def to_json(self) -> dict[str, float | bool | None]:
        return {
            "loss": self.loss,
            "d": self.d,
            "value": _json_float(self.value),
            "low": _json_float(self.low),
            "high": _json_float(self.high),
            "finite": self.finite,
            "infinite_fraction": self.infinite_fraction,
        }


@dataclass
class Fit:
    law: Law
    params: dict[str, float]
    points: list[Point]
    intervals: dict[str, Interval] = field(default_factory=dict)
    samples: np.ndarray | None = None  # bootstrap refits, one row per resample (LAW_PARAMS order)
    objective: float = float("nan")
    confidence: float = 0.95
    quantity: str = "L"  # what was fitted, as the formula names it: L (a loss), err, ...

    def predict(self, n: float | np.ndarray, d: float | np.ndarray | None = None) -> np.ndarray:
        return _predict(self.law, _vector(self.law, self.params), n, d)

    def residuals(self) -> np.ndarray:
        """log(observed) - log(predicted) per point: multiplicative error of the law."""
        n, d, loss = _arrays(self.points, self.law)
        return np.log(loss) - np.log(self.predict(n, d))

    def effective_size(self, loss: float, d: float | None = None) -> EffectiveSize:
        value = float(_invert(self.law, _vector(self.law, self.params), loss, d))
        low = high = value
        infinite = 0.0
        if self.samples is not None and len(self.samples):
            boot = np.array([_invert(self.law, row, loss, d) for row in self.samples])
            boot = boot[~np.isnan(boot)]
            if len(boot):
                infinite = float(np.mean(np.isinf(boot)))
                tail = (1 - self.confidence) / 2
                # no interpolation: it would turn inf - inf into nan when some refits say inf
                low, high = np.quantile(boot, [tail, 1 - tail], method="inverted_cdf")
        return EffectiveSize(loss, d, value, float(low), float(high), infinite)

    def floor(self, d: float | None) -> float:
        """The loss an infinitely large model reaches on ``d`` tokens (0 under Kaplan)."""
        if self.law == "kaplan":
            return 0.0
        p = self.params
        if self.law == "floor":
            return p["E"]
        return p["E"] + (p["B"] / d ** p["beta"] if d else 0.0)

    def at_bounds(self) -> list[str]:
        """Chinchilla (or floor-law) parameters the fit left on the edge of their box: the
        data do not determine them (too few model sizes or token budgets)."""
        if self.law == "kaplan":
            return []
        vec = _vector(self.law, self.params)
        theta = _to_theta(vec) if self.law == "chinchilla" else _floor_to_theta(vec)
        bounds = _BOUNDS if self.law == "chinchilla" else _FLOOR_BOUNDS
        return [
            k
            for k, v, (lo, hi) in zip(LAW_PARAMS[self.law], theta, bounds, strict=True)
            if min(abs(v - lo), abs(v - hi)) < 1e-6 * max(1.0, abs(v))
        ]

    def formula(self) -> str:
        p, q = self.params, self.quantity
        if self.law == "kaplan":
            return f"{q}(N) = ({p['N_c']:.4g} / N)^{p['alpha_N']:.4f}"
        if self.law == "floor":
            return f"{q}(N) = {p['E']:.4g} + {p['A']:.4g} / N^{p['alpha']:.4f}"
        return (
            f"{q}(N, D) = {p['E']:.4f} + {p['A']:.4g} / N^{p['alpha']:.4f} "
            f"+ {p['B']:.4g} / D^{p['beta']:.4f}"
        )

    def to_json(self) -> dict:
        return {
            "law": self.law,
            "formula": self.formula(),
            "quantity": self.quantity,
            "parameter_count": PARAMETER_COUNT,
            "params": {
                k: self.intervals[k].to_json() if k in self.intervals else {"value": _json_float(v)}
                for k, v in self.params.items()
            },
            "confidence": self.confidence,
            "bootstrap_resamples": 0 if self.samples is None else len(self.samples),
            "points": len(self.points),
            "residual_rms_log": float(np.sqrt(np.mean(self.residuals() ** 2))),
        }


# --- validation ---------------------------------------------------------------------------


def check_points(points: Sequence[Point], law: Law) -> None:
    """Raise ScalingError, naming the offending points, for input no fit can use."""
    need = len(LAW_PARAMS[law])
    if len(points) < need:
        raise ScalingError(
            f"the {law} law has {need} parameters ({', '.join(LAW_PARAMS[law])}) but "
            f"there {'is' if len(points) == 1 else 'are'} only {len(points)} point(s); "
            f"give at least {need} runs (more for useful intervals)"
        )
    bad = []
    for i, p in enumerate(points):
        label = p.name or f"point {i + 1}"
        if not (math.isfinite(p.n) and p.n > 0):
            bad.append(f"{label}: N={p.n!r} (parameters must be > 0)")
        d_needed = law == "chinchilla" or p.d is not None  # Kaplan ignores an absent D
        if d_needed and (p.d is None or not (math.isfinite(p.d) and p.d > 0)):
            bad.append(f"{label}: D={p.d!r} (training tokens must be > 0)")
        if not (math.isfinite(p.loss) and p.loss > 0):
            bad.append(f"{label}: loss={p.loss!r} (must be a positive number)")
    if bad:
        raise ScalingError("cannot fit these points:\n  " + "\n  ".join(bad))
    if len({p.n for p in points}) < 2:
        raise ScalingError(
            f"all {len(points)} points have the same N={points[0].n:g}: a law in N needs "
            f"at least two model sizes"
        )
    if law == "floor" and len({p.n for p in points}) < 3:
        raise ScalingError(
            "the floor law E + A/N^alpha needs at least three model sizes (two sizes "
            "cannot tell the floor E from the slope); use --law kaplan, or add sizes"
        )
    if law == "chinchilla":
        distinct_d = len({_rounded(p.d) for p in points})
        if distinct_d < 2:
            raise ScalingError(
                "every point has the same D (an equal-token sweep): B and beta of the "
                "Chinchilla law cannot be told from E; use --law kaplan, or add runs with "
                "other token budgets (a compute-optimal sweep, or --grid train.steps=...)"
            )
        if _collinear(points):
            raise ScalingError(
                "D grows as a fixed power of N over these runs (a compute-optimal sweep): "
                "the N and D terms of the Chinchilla law cannot be told apart; use --law "
                "kaplan, or add runs of the same sizes with other token budgets"
            )


def _collinear(points: Sequence[Point]) -> bool:
    """log D an affine function of log N (D = k N^c, e.g. 20 tokens per parameter)."""
    x = np.log([p.n for p in points])
    z = np.log([p.d for p in points])
    design = np.column_stack([np.ones_like(x), x, z])
    return bool(np.linalg.matrix_rank(design, tol=1e-6 * np.abs(design).max()) < 3)


def choose_law(points: Sequence[Point]) -> tuple[Law, str]:
    """The law --law auto uses, and why."""
    ds = {_rounded(p.d) for p in points if p.d is not None}
    known_d = all(p.d is not None for p in points)
    positive = known_d and all(p.d > 0 and p.n > 0 for p in points)  # else check_points says
    collinear = positive and len(ds) >= 2 and _collinear(points)
    if positive and len(ds) >= 2 and not collinear and len(points) >= 10:
        return "chinchilla", f"{len(points)} points over {len(ds)} token budgets"
    if not known_d:
        why = "D is not known for every point"
    elif len(ds) < 2:
        why = "every point has the same D"
    elif collinear:
        why = "D is a fixed power of N (compute-optimal runs)"
    else:
        why = f"{len(points)} points are too few for 5 parameters (auto wants 10)"
    return "kaplan", why


def choose_error_law(points: Sequence[Point]) -> tuple[Law, str]:
    """The law --law auto uses for a downstream error (1 - accuracy): Chinchilla where
    ``choose_law`` takes it, else the floor law E + A/N^α from ``FLOOR_MIN_POINTS`` runs
    over ``FLOOR_MIN_SIZES`` model sizes (an error does not fall to 0), else Kaplan's power
    law (the floor cannot be told from the slope on fewer)."""
    law, why = choose_law(points)
    if law == "chinchilla":
        return law, why
    sizes = len({p.n for p in points})
    if len(points) >= FLOOR_MIN_POINTS and sizes >= FLOOR_MIN_SIZES:
        return "floor", f"{len(points)} points over {sizes} model sizes; {why}"
    return "kaplan", (
        f"{why}, and {len(points)} points over {sizes} sizes are too few for a floor: auto "
        f"wants {FLOOR_MIN_POINTS} over {FLOOR_MIN_SIZES}"
    )


# --- fitting ------------------------------------------------------------------------------


def fit(
    points: Sequence[Point],
    law: Law = "kaplan",
    bootstrap: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    quantity: str = "L",
) -> Fit:
    """Fit ``law`` to the points, with percentile bootstrap intervals over ``bootstrap``
    resamples of the points (0: no intervals). ``quantity`` names what ``Point.loss``
    holds (L: a loss; err: 1 - accuracy, ...) in the formula and the messages."""
    if law not in LAW_PARAMS:
        raise ScalingError(f"unknown law {law!r}; laws: {', '.join(LAW_PARAMS)}")
    if not 0 < confidence < 1:
        raise ScalingError(f"confidence must be between 0 and 1, got {confidence}")
    points = list(points)
    check_points(points, law)
    with _one_blas_thread():
        result = _fit(points, law, bootstrap, confidence, seed, quantity)
    result.quantity = quantity
    return result


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """L-BFGS-B makes thousands of BLAS calls on 5-vectors; a multi-threaded OpenBLAS
    spends ~14x the CPU in thread hand-offs on them (measured on a 2-core machine)."""
    try:
        from threadpoolctl import threadpool_limits  # via scikit-learn (weightwatcher)
    except ImportError:  # pragma: no cover - then the fits are only slower
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


def _fit(
    points: list[Point], law: Law, bootstrap: int, confidence: float, seed: int, quantity: str
) -> Fit:
    n, d, loss = _arrays(points, law)
    if law in ("kaplan", "floor"):
        vec, obj = _fit_kaplan(n, loss), float("nan")
        if not vec[1] > 1e-9:
            what = "the loss" if quantity == "L" else quantity
            raise ScalingError(
                f"{what} does not fall with N over these {len(points)} points (fitted "
                f"alpha_N = {vec[1]:.3g}): there is no power law in N to fit; were the runs "
                f"trained long enough for size to matter?"
            )
        if law == "floor":
            vec, obj = _fit_floor(n, loss, _FLOOR_GRID)
    else:
        vec, obj = _fit_chinchilla(n, d, loss, _GRID)
    result = Fit(law, _named(law, vec), points, objective=obj, confidence=confidence)
    if bootstrap > 0:
        result.samples = _bootstrap(law, n, d, loss, vec, bootstrap, seed)
        tail = (1 - confidence) / 2
        for i, key in enumerate(LAW_PARAMS[law]):
            column = result.samples[:, i] if len(result.samples) else np.array([vec[i]])
            low, high = np.quantile(column, [tail, 1 - tail])
            result.intervals[key] = Interval(result.params[key], float(low), float(high))
    return result


def _fit_kaplan(n: np.ndarray, loss: np.ndarray) -> np.ndarray:
    slope, intercept = np.polyfit(np.log(n), np.log(loss), 1)
    alpha = -slope
    # log L = alpha log N_c - alpha log N; alpha = 0 (flat data) has no N_c
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        n_c = float(np.exp(intercept / alpha)) if abs(alpha) > 1e-12 else float("inf")
    return np.array([n_c, alpha])


# Hoffmann et al.'s grid of initialisations for (e, a, b, alpha, beta)
_GRID = np.array(
    list(
        itertools.product(
            np.arange(-1.0, 1.51, 0.5),  # e
            np.arange(0.0, 25.1, 5.0),  # a
            np.arange(0.0, 25.1, 5.0),  # b
            np.arange(0.0, 2.01, 0.5),  # alpha
            np.arange(0.0, 2.01, 0.5),  # beta
        )
    )
)
# A box around every law seen in practice (exponents of LMs are 0.05-0.8; Hoffmann et al.'s
# grid spans 0-2): it changes nothing on data that determine the law, and keeps a fit on
# too few token budgets from running off to beta = 30, B = 1e97
_BOUNDS = [(-30.0, 10.0), (-30.0, 60.0), (-30.0, 60.0), (0.0, 3.0), (0.0, 3.0)]
_REFINE = 12  # L-BFGS runs from the best grid points (the whole grid costs ~400x more)


def _huber_objective(theta: np.ndarray, x: np.ndarray, z: np.ndarray, y: np.ndarray):
    """Sum of Huber(LSE(a - alpha x, b - beta z, e) - y) and its gradient, scaled by 1/δ²
    so that L-BFGS's tolerances see numbers of order one."""
    e, a, b, alpha, beta = theta
    u = np.stack([a - alpha * x, b - beta * z, np.full_like(x, e)])
    top = u.max(axis=0)
    w = np.exp(u - top)
    s = w.sum(axis=0)
    r = top + np.log(s) - y
    w /= s
    small = np.abs(r) <= HUBER_DELTA
    value = np.where(small, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum()
    dr = np.where(small, r, HUBER_DELTA * np.sign(r))
    grad = np.array(
        [
            (dr * w[2]).sum(),
            (dr * w[0]).sum(),
            (dr * w[1]).sum(),
            -(dr * w[0] * x).sum(),
            -(dr * w[1] * z).sum(),
        ]
    )
    scale = 1.0 / HUBER_DELTA**2
    return value * scale, grad * scale


def _grid_objective(grid: np.ndarray, x: np.ndarray, z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The objective at every grid point at once (to choose where L-BFGS starts)."""
    e, a, b, alpha, beta = (grid[:, i : i + 1] for i in range(5))
    u = np.stack([a - alpha * x, b - beta * z, np.broadcast_to(e, (len(grid), len(x)))])
    r = np.logaddexp.reduce(u, axis=0) - y
    ar = np.abs(r)
    return np.where(ar <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (ar - 0.5 * HUBER_DELTA)).sum(1)


def _fit_chinchilla(
    n: np.ndarray, d: np.ndarray, loss: np.ndarray, starts: np.ndarray, refine: int = _REFINE
) -> tuple[np.ndarray, float]:
    x, z, y = np.log(n), np.log(d), np.log(loss)
    if len(starts) > refine:
        starts = starts[np.argsort(_grid_objective(starts, x, z, y))[:refine]]
    best, best_value = None, math.inf
    for theta0 in starts:
        res = minimize(
            _huber_objective,
            theta0,
            args=(x, z, y),
            jac=True,
            method="L-BFGS-B",
            bounds=_BOUNDS,
            options={"maxiter": 2000, "ftol": 1e-14, "gtol": 1e-10},
        )
        if np.all(np.isfinite(res.x)) and res.fun < best_value:
            best, best_value = res.x, float(res.fun)
    assert best is not None
    return _from_theta(best), best_value


# the floor law E + A/N^alpha: (e, a, alpha) with E = e^e, A = e^a; e reaches down to
# e^-8 = 3e-4 (an error or loss that small is as good as no floor)
_FLOOR_GRID = np.array(
    list(
        itertools.product(
            np.arange(-4.0, 1.51, 0.5),  # e: floors from 0.02 (an error) to 4.5 (a loss)
            np.arange(0.0, 25.1, 2.5),  # a
            np.arange(0.0, 2.01, 0.25),  # alpha
        )
    )
)
_FLOOR_BOUNDS = [(-30.0, 10.0), (-30.0, 60.0), (0.0, 3.0)]


def _floor_objective(theta: np.ndarray, x: np.ndarray, y: np.ndarray):
    """Sum of Huber(LSE(a - alpha x, e) - y) and its gradient, scaled as
    ``_huber_objective`` (the Chinchilla objective without its D term)."""
    e, a, alpha = theta
    u = np.stack([a - alpha * x, np.full_like(x, e)])
    top = u.max(axis=0)
    w = np.exp(u - top)
    s = w.sum(axis=0)
    r = top + np.log(s) - y
    w /= s
    small = np.abs(r) <= HUBER_DELTA
    value = np.where(small, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum()
    dr = np.where(small, r, HUBER_DELTA * np.sign(r))
    grad = np.array([(dr * w[1]).sum(), (dr * w[0]).sum(), -(dr * w[0] * x).sum()])
    scale = 1.0 / HUBER_DELTA**2
    return value * scale, grad * scale


def _floor_grid_objective(grid: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    e, a, alpha = (grid[:, i : i + 1] for i in range(3))
    r = np.logaddexp(a - alpha * x, np.broadcast_to(e, (len(grid), len(x)))) - y
    ar = np.abs(r)
    return np.where(ar <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (ar - 0.5 * HUBER_DELTA)).sum(1)


def _fit_floor(
    n: np.ndarray, loss: np.ndarray, starts: np.ndarray, refine: int = _REFINE
) -> tuple[np.ndarray, float]:
    x, y = np.log(n), np.log(loss)
    if len(starts) > refine:
        starts = starts[np.argsort(_floor_grid_objective(starts, x, y))[:refine]]
    best, best_value = None, math.inf
    for theta0 in starts:
        res = minimize(
            _floor_objective,
            theta0,
            args=(x, y),
            jac=True,
            method="L-BFGS-B",
            bounds=_FLOOR_BOUNDS,
            options={"maxiter": 2000, "ftol": 1e-14, "gtol": 1e-10},
        )
        if np.all(np.isfinite(res.x)) and res.fun < best_value:
            best, best_value = res.x, float(res.fun)
    assert best is not None
    e, a, alpha = best
    return np.array([math.exp(e), math.exp(a), alpha]), best_value


def _floor_to_theta(vec: np.ndarray) -> np.ndarray:
    low = math.exp(_FLOOR_BOUNDS[0][0])
    return np.array([math.log(max(vec[0], low)), math.log(max(vec[1], low)), vec[2]])


def _from_theta(theta: np.ndarray) -> np.ndarray:
    """(e, a, b, alpha, beta) -> (E, A, B, alpha, beta)"""
    e, a, b, alpha, beta = theta
    return np.array([math.exp(e), math.exp(a), math.exp(b), alpha, beta])


def _to_theta(vec: np.ndarray) -> np.ndarray:
    # E (or A, B) can sit at the lower bound when the data want no floor: log of it, not -inf
    logs = [math.log(max(v, math.exp(_BOUNDS[0][0]))) for v in vec[:3]]
    return np.array([*logs, vec[3], vec[4]])


def _bootstrap(
    law: Law,
    n: np.ndarray,
    d: np.ndarray | None,
    loss: np.ndarray,
    vec: np.ndarray,
    resamples: int,
    seed: int,
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = []
    if law == "chinchilla":
        # each refit starts from the full fit and the best grid point: the full grid
        # per resample would cost minutes for a few hundred resamples
        here = _to_theta(vec)[None, :]
        x, z, y = np.log(n), np.log(d), np.log(loss)
        starts = np.concatenate([here, _GRID[np.argsort(_grid_objective(_GRID, x, z, y))[:1]]])
    elif law == "floor":
        x, y = np.log(n), np.log(loss)
        best = _FLOOR_GRID[np.argsort(_floor_grid_objective(_FLOOR_GRID, x, y))[:1]]
        starts = np.concatenate([_floor_to_theta(vec)[None, :], best])
    sizes_needed = 3 if law == "floor" else 2
    tries = 0
    while len(rows) < resamples and tries < 20 * resamples:
        tries += 1
        idx = rng.integers(0, len(n), len(n))
        # a resample with a single model size (or token budget) fits nothing: draw again
        if len(np.unique(n[idx])) < sizes_needed:
            continue
        if law == "kaplan":
            rows.append(_fit_kaplan(n[idx], loss[idx]))
        elif law == "floor":
            rows.append(_fit_floor(n[idx], loss[idx], starts, refine=len(starts))[0])
        else:
            if len(np.unique(np.round(np.log(d[idx]), 6))) < 2:
                continue
            rows.append(_fit_chinchilla(n[idx], d[idx], loss[idx], starts, refine=len(starts))[0])
    return np.array(rows).reshape(-1, len(LAW_PARAMS[law]))


# --- the laws themselves ------------------------------------------------------------------


def _predict(law: Law, vec: np.ndarray, n, d=None) -> np.ndarray:
    n = np.asarray(n, dtype=float)
    if law == "kaplan":
        n_c, alpha = vec
        return (n_c / n) ** alpha
    if law == "floor":
        e, a, alpha = vec
        return e + a / n**alpha
    if d is None:
        raise ScalingError("the Chinchilla law needs D (training tokens) to predict a loss")
    e, a, b, alpha, beta = vec
    return e + a / n**alpha + b / np.asarray(d, dtype=float) ** beta


def _invert(law: Law, vec: np.ndarray, loss: float, d: float | None) -> float:
    """N with predict(N, d) == loss; inf when no finite N gets there, nan when undefined."""
    if law == "kaplan":
        n_c, alpha = vec
        if alpha <= 0 or not math.isfinite(n_c):
            return float("nan")  # a flat or rising law maps no loss to one size
        return float(n_c * loss ** (-1.0 / alpha))
    if law == "floor":
        e, a, alpha = vec
        if loss - e <= 0:
            return float("inf")  # at or below the floor: no finite model gets there
        return float((a / (loss - e)) ** (1.0 / alpha)) if alpha > 0 else float("nan")
    if d is None:
        raise ScalingError("the Chinchilla effective size needs the run's D (training tokens)")
    e, a, b, alpha, beta = vec
    excess = loss - e - b / d**beta  # what the finite size must still explain
    if excess <= 0:
        return float("inf")
    if alpha <= 0:
        return float("nan")
    return float((a / excess) ** (1.0 / alpha))


def _vector(law: Law, params: dict[str, float]) -> np.ndarray:
    return np.array([params[k] for k in LAW_PARAMS[law]])


def _named(law: Law, vec: np.ndarray) -> dict[str, float]:
    return {k: float(v) for k, v in zip(LAW_PARAMS[law], vec, strict=True)}


def _arrays(points: Sequence[Point], law: Law):
    n = np.array([p.n for p in points], dtype=float)
    loss = np.array([p.loss for p in points], dtype=float)
    d = np.array([p.d for p in points], dtype=float) if law == "chinchilla" else None
    return n, d, loss


def _rounded(d: float | None) -> float | None:
    # token counts that differ by rounding only (a batch short) are the same budget
    if d is None or not (math.isfinite(d) and d > 0):
        return d  # check_points reports it; the law chooser must not fail on it first
    return round(math.log(d), 2)


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "nan" if math.isnan(x) else "-inf")


def compute_6nd(n: float | np.ndarray, d: float | np.ndarray) -> float | np.ndarray:
    """Approximate training compute C ≈ 6·N·D FLOPs for N non-embedding parameters trained
    on D tokens (Kaplan et al. 2020, sec. 2.1): the axis of compute scaling laws, not the
    exact count (see the module docstring)."""
    return 6 * n * d


def fmt_count(x: float | None) -> str:
    """1.23M, 4.1B, inf: counts of parameters or tokens for people."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf"
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div * 0.9995:  # 999.9M is 1B at three digits, not 1e+03M
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"
