"""Scaling-law fits: known laws are recovered, the effective size inverts the law, bad
input is a clear error. Pure numerics: no training here (see test_sweep.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from yoto.scaling.laws import Fit, Point, ScalingError, choose_law, compute_6nd, fit

# Hoffmann et al. 2022, eq. 10 (their approach-3 fit)
HOFFMANN = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def chinchilla_loss(n, d, p=HOFFMANN):
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def chinchilla_points(noise: float, seed: int = 0, params=HOFFMANN) -> list[Point]:
    rng = np.random.default_rng(seed)
    return [
        Point(n, d, chinchilla_loss(n, d, params) * math.exp(rng.normal(0, noise)), f"{n:.0e}")
        for n in np.geomspace(1e7, 1e10, 6)
        for d in np.geomspace(1e9, 1e12, 5)
    ]


def kaplan_points(n_c: float, alpha: float, noise: float, seed: int = 0) -> list[Point]:
    rng = np.random.default_rng(seed)
    return [
        Point(n, 1e9, (n_c / n) ** alpha * math.exp(rng.normal(0, noise)))
        for n in np.geomspace(1e5, 1e9, 9)
    ]


@pytest.mark.parametrize(("n_c", "alpha"), [(8.8e13, 0.076), (2e7, 0.3)])
def test_kaplan_recovers_known_law(n_c: float, alpha: float) -> None:
    result = fit(kaplan_points(n_c, alpha, noise=2e-4, seed=3), "kaplan", bootstrap=200)
    assert result.params["alpha_N"] == pytest.approx(alpha, rel=0.05)
    assert result.params["N_c"] == pytest.approx(n_c, rel=0.05)
    iv = result.intervals["alpha_N"]
    assert iv.low <= alpha <= iv.high and iv.low < iv.high


def test_chinchilla_recovers_hoffmann_parameters() -> None:
    result = fit(chinchilla_points(noise=1e-3, seed=1), "chinchilla", bootstrap=40)
    for key, true in HOFFMANN.items():
        assert result.params[key] == pytest.approx(true, rel=0.05), key
        iv = result.intervals[key]
        assert iv.low <= result.params[key] * 1.0001 and iv.high >= result.params[key] * 0.9999
    assert np.sqrt(np.mean(result.residuals() ** 2)) < 3e-3


def test_chinchilla_recovers_other_parameters() -> None:
    # not Hoffmann's numbers, so the grid of initialisations is what finds them
    other = {"E": 0.8, "A": 60.0, "B": 2000.0, "alpha": 0.5, "beta": 0.4}
    result = fit(chinchilla_points(noise=0.0, params=other), "chinchilla", bootstrap=0)
    for key, true in other.items():
        assert result.params[key] == pytest.approx(true, rel=0.05), key


def test_effective_size_inverts_hoffmann_law() -> None:
    law = Fit("chinchilla", dict(HOFFMANN), points=[])
    for n, d in [(1e8, 2e9), (7e10, 1.4e12), (2.8e11, 3e11), (1.3e10, 2e10)]:
        eff = law.effective_size(chinchilla_loss(n, d), d)
        assert eff.finite and eff.value == pytest.approx(n, rel=1e-9)
    # BigScience's question: a run worse than the law says performs like a smaller model
    n, d = 1.3e10, 3.5e11
    eff = law.effective_size(chinchilla_loss(n, d) + 0.05, d)
    assert eff.value < n


def test_effective_size_below_the_floor_is_infinite() -> None:
    law = Fit("chinchilla", dict(HOFFMANN), points=[])
    d = 1e11
    floor = law.floor(d)
    assert floor == pytest.approx(HOFFMANN["E"] + HOFFMANN["B"] / d ** HOFFMANN["beta"])
    eff = law.effective_size(floor - 0.01, d)
    assert not eff.finite and eff.value == math.inf
    assert eff.to_json()["value"] == "inf"


def test_effective_size_interval_from_a_fit_contains_the_true_size() -> None:
    result = fit(chinchilla_points(noise=2e-3, seed=5), "chinchilla", bootstrap=40)
    n, d = 3e8, 5e10
    eff = result.effective_size(chinchilla_loss(n, d), d)
    assert eff.low <= n <= eff.high
    assert eff.value == pytest.approx(n, rel=0.1)


def test_kaplan_effective_size_inverts() -> None:
    law = Fit("kaplan", {"N_c": 8.8e13, "alpha_N": 0.076}, points=[])
    n = 5e8
    assert law.effective_size((8.8e13 / n) ** 0.076).value == pytest.approx(n, rel=1e-9)


def test_law_decreases_in_n_and_d() -> None:
    result = fit(chinchilla_points(noise=1e-3), "chinchilla", bootstrap=0)
    assert np.all(np.diff(result.predict(np.geomspace(1e6, 1e11, 20), 1e10)) < 0)
    assert np.all(np.diff(result.predict(1e9, np.geomspace(1e8, 1e13, 20))) < 0)


def test_auto_chooses_chinchilla_only_when_d_varies() -> None:
    assert choose_law(chinchilla_points(0.0))[0] == "chinchilla"
    assert choose_law(kaplan_points(1e10, 0.1, 0.0))[0] == "kaplan"  # one D
    assert choose_law([Point(1e6, None, 3.0), Point(1e7, None, 2.5)])[0] == "kaplan"
    optimal = [Point(n, 20 * n, 10 / n**0.1) for n in np.geomspace(1e6, 1e9, 10)]
    assert choose_law(optimal) == ("kaplan", "D is a fixed power of N (compute-optimal runs)")


@pytest.mark.parametrize(
    ("points", "law", "message"),
    [
        ([Point(1e6, 1e9, 3.0)], "kaplan", "the kaplan law has 2 parameters (N_c, alpha_N)"),
        (
            [Point(10.0**i, 10.0 ** (i + 3), 3.0 - i / 10) for i in range(4)],
            "chinchilla",
            "has 5 parameters (E, A, B, alpha, beta) but there are only 4 point(s)",
        ),
        (
            [Point(0.0, 1e9, 3.0, "small"), Point(1e6, 1e9, 2.5)],
            "kaplan",
            "small: N=0.0 (parameters must be > 0)",
        ),
        (
            [Point(1e6, -5.0, 3.0, "neg"), Point(1e7, 1e9, 2.5)],
            "kaplan",
            "neg: D=-5.0 (training tokens must be > 0)",
        ),
        (
            [Point(10.0**i, None, 3.0) for i in range(5, 11)],
            "chinchilla",
            "D=None (training tokens must be > 0)",
        ),
        ([Point(1e6, 1e9, math.nan), Point(1e7, 1e9, 2.0)], "kaplan", "loss=nan"),
        ([Point(1e6, 1e9, 3.0), Point(1e6, 1e9, 2.9)], "kaplan", "the same N=1e+06"),
        (
            [Point(1e6, 1e9, 3.0), Point(1e7, 1e9, 3.1), Point(1e8, 1e9, 3.2)],
            "kaplan",
            "the loss does not fall with N over these 3 points",
        ),
        (
            [Point(10.0**i, 1e9, 4.0 - i / 5) for i in range(5, 11)],
            "chinchilla",
            "every point has the same D",
        ),
        (
            [Point(10.0**i, 20 * 10.0**i, 4.0 - i / 5) for i in range(5, 11)],
            "chinchilla",
            "D grows as a fixed power of N over these runs",
        ),
    ],
)
def test_bad_points_are_clear_errors(points, law, message) -> None:
    with pytest.raises(ScalingError) as err:
        fit(points, law, bootstrap=0)
    assert message in str(err.value)


def test_unknown_law_is_an_error() -> None:
    with pytest.raises(ScalingError, match="unknown law 'power'"):
        fit(kaplan_points(1e10, 0.1, 0.0), "power")  # type: ignore[arg-type]


def test_compute_6nd_is_six_flops_per_parameter_and_token() -> None:
    assert compute_6nd(1e9, 2e10) == pytest.approx(1.2e20)
    grid = compute_6nd(np.array([1e6, 1e7]), 1e9)
    assert grid.tolist() == pytest.approx([6e15, 6e16])
