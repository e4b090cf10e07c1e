"""Scaling-law inputs from run directories or a CSV table, and the fit report.

Reads only the run store (manifest and its summary), never the trainer, so the CLI and the
Streamlit explorer share it. For each run:

* N = ``non_embedding_parameters`` from the manifest (what ``yoto train`` recorded),
* D = ``yoto_tokens_total`` at the end of the run (tokens on the surviving branch),
* loss = the last ``yoto_val_loss{source=...}`` of each source; the ``all`` series is the
  mean over sources (every source is validated on the same number of sequences, so this is
  the mean over all validation sequences).

CSV tables (``--table``): a header row, then one point per row. Columns (names are case
insensitive): ``N`` (non-embedding parameters, required), ``loss`` (required), ``D``
(training tokens; without it only the Kaplan law fits), ``source`` (optional: one fit per
source), ``name`` (optional label).

Few-shot scores (``yoto eval``, the run's ``evals/`` table; ``--metric eval:TASK/METRIC``):
a run's **final score** for TASK/METRIC is the row of the newest evaluated step, ties (the
same step on several attempts, or evaluated twice) to the highest attempt and then the row
written last; its D is ``yoto_tokens_total`` at that step in the metrics table (on the
highest attempt, at most the row's, that recorded the step). ``SCORE_METRICS`` says which
way each metric is better and how it becomes a quantity that falls with N like a loss (1 -
accuracy, the log of a perplexity); ``fit_scores`` fits it and sets each run's effective
size by score beside the one by its validation loss.
"""

from __future__ import annotations

import csv
import math
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from yoto import catalog, runstore
from yoto.errors import RunDirError

from . import laws
from .laws import (
    LAW_NAMES,
    PARAMETER_COUNT,
    EffectiveSize,
    Fit,
    Law,
    Point,
    ScalingError,
    choose_error_law,
    choose_law,
    fmt_count,
)
from .laws import fit as fit_law

ALL = "all"  # the mean over sources


@dataclass
class RunRecord:
    path: Path
    id: str
    name: str
    status: str
    n: float | None
    d: float | None
    val_loss: dict[str, float]
    sweep: dict[str, Any] | None = None
    scores: dict[str, Score] = field(default_factory=dict)  # "task/metric" -> final score

    def loss(self, source: str) -> float | None:
        if source == ALL:
            if not self.val_loss:
                return None
            return sum(self.val_loss.values()) / len(self.val_loss)
        return self.val_loss.get(source)

    @property
    def compute_6nd(self) -> float | None:
        """Approximate training compute C ≈ 6·N·D (``laws.compute_6nd``), when N and D
        are known."""
        return laws.compute_6nd(self.n, self.d) if self.n and self.d else None


def read_run(path: str | Path) -> RunRecord:
    manifest = runstore.read_manifest(path)
    summary = manifest.get("summary") or {}
    n = manifest.get("non_embedding_parameters")
    d = summary.get(catalog.TOKENS.name)
    val = {
        s: float(v)
        for s, v in (summary.get("val_loss") or {}).items()
        if v is not None and math.isfinite(v)
    }
    return RunRecord(
        path=Path(path),
        id=manifest.get("id", Path(path).name),
        name=manifest.get("name", ""),
        status=manifest.get("status", "unknown"),
        n=float(n) if n is not None else None,
        d=float(d) if d is not None else None,
        val_loss=val,
        sweep=manifest.get("sweep"),
        scores=final_scores(path),
    )


def load_runs(paths: Iterable[str | Path], sweep: str | None = None) -> list[RunRecord]:
    """Runs named directly, or found under roots (``runstore.find_runs``); with ``sweep``,
    only that sweep's runs. A damaged run named directly is an error; one found under a
    root is left out with a warning, as ``yoto runs list`` does."""
    paths = list(paths)
    named = {Path(p).resolve() for p in paths if runstore.is_run_dir(p)}
    records: list[RunRecord] = []
    for path in runstore.find_runs(paths):
        try:
            records.append(read_run(path))
        except RunDirError as exc:
            if path.resolve() in named:
                raise
            print(f"warning: {exc}", file=sys.stderr)
    if sweep is not None:
        found = sorted({r.sweep["id"] for r in records if r.sweep})
        records = [r for r in records if r.sweep and r.sweep.get("id") == sweep]
        if not records:
            raise ScalingError(
                f"no runs of sweep {sweep!r} under {', '.join(map(str, paths))}; sweeps "
                f"there: {', '.join(found) or 'none'}"
            )
    if not records:
        raise ScalingError(f"no run directories under {', '.join(map(str, paths))}")
    records.sort(key=lambda r: (r.sweep or {}).get("index", 0) if r.sweep else r.n or 0)
    return records


def check_runs(records: list[RunRecord], skip_missing: bool = False) -> list[RunRecord]:
    """Runs a fit can use. Without ``skip_missing`` a run lacking N, D or a validation loss
    is an error that names it; with it, such runs are left out with a warning."""
    problems = []
    for r in records:
        why = []
        if not r.val_loss:
            why.append("no validation loss (eval never ran: eval.every=0 and it did not finish?)")
        if r.n is None:
            why.append("no non_embedding_parameters in its manifest")
        if r.d is None:
            why.append("no yoto_tokens_total (it recorded no step)")
        if why:
            problems.append((r, "; ".join(why)))
    if problems and not skip_missing:
        lines = [f"{r.path}: {why}" for r, why in problems]
        raise ScalingError(
            "cannot fit runs without a validation loss, N or D:\n  "
            + "\n  ".join(lines)
            + "\n(leave them out, or pass --skip-missing)"
        )
    for r, why in problems:
        print(f"warning: leaving out {r.path}: {why}", file=sys.stderr)
    bad = {id(r) for r, _ in problems}
    kept = [r for r in records if id(r) not in bad]
    for r in kept:
        if r.status != "finished":  # its schedule did not end: the loss is not its final one
            print(
                f"warning: {r.path} is {r.status}; using its last validation loss", file=sys.stderr
            )
    return kept


def sources_of(records: list[RunRecord]) -> list[str]:
    """Sources every run has a validation loss for."""
    common = set.intersection(*(set(r.val_loss) for r in records)) if records else set()
    return sorted(common)


def points_from_runs(records: list[RunRecord], source: str = ALL) -> list[Point]:
    points = []
    for r in records:
        loss = r.loss(source)
        if loss is None:
            have = ", ".join(sorted(r.val_loss)) or "none"
            raise ScalingError(
                f"run {r.path} has no validation loss for source {source!r} (it has: {have})"
            )
        points.append(Point(r.n or 0.0, r.d, loss, name=r.name or r.id, source=source))
    return points


def read_table(path: str | Path) -> list[Point]:
    """Points from a CSV table (columns in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ScalingError(f"table {str(path)!r} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ScalingError(f"table {str(path)!r} is empty (expected a header: N,D,loss)")
        columns = {c.strip().lower(): c for c in reader.fieldnames if c}
        missing = [c for c in ("n", "loss") if c not in columns]
        if missing:
            raise ScalingError(
                f"table {str(path)!r} has no {' or '.join(missing)} column; columns: "
                f"{', '.join(reader.fieldnames)} (expected N, D, loss, optional source, name)"
            )
        points = []
        for row_no, row in enumerate(reader, start=2):
            try:
                n = float(row[columns["n"]])
                loss = float(row[columns["loss"]])
                d_text = row[columns["d"]].strip() if "d" in columns else ""
                d = float(d_text) if d_text else None
            except (TypeError, ValueError):
                raise ScalingError(
                    f"{path}:{row_no}: N, D and loss must be numbers, got {dict(row)}"
                ) from None
            name = (row.get(columns.get("name", ""), "") or "").strip() or f"row {row_no}"
            source = (row.get(columns.get("source", ""), "") or "").strip()
            points.append(Point(n, d, loss, name=name, source=source))
    if not points:
        raise ScalingError(f"table {str(path)!r} has a header but no rows")
    return points


# --- fitting groups and reporting ---------------------------------------------------------


@dataclass
class GroupFit:
    source: str  # ALL, a source name, or "" for a table without sources
    fit: Fit
    why: str  # why this law (auto) or "requested"
    effective: list[Any] = field(default_factory=list)  # EffectiveSize per point


def fit_points(
    points: list[Point], law: str = "auto", bootstrap: int = 200, seed: int = 0
) -> tuple[Fit, str]:
    if law == "auto":
        chosen, why = choose_law(points)
    else:
        chosen, why = law, "requested"
    return fit_law(points, chosen, bootstrap=bootstrap, seed=seed), why  # type: ignore[arg-type]


def fit_groups(
    groups: dict[str, list[Point]], law: str = "auto", bootstrap: int = 200, seed: int = 0
) -> list[GroupFit]:
    out = []
    for source, points in groups.items():
        result, why = fit_points(points, law, bootstrap, seed)
        eff = [result.effective_size(p.loss, p.d) for p in points]
        out.append(GroupFit(source, result, why, eff))
    return out


def groups_from_runs(records: list[RunRecord], source: str | None = None) -> dict[str, list]:
    """One group per fit: the given source; else the mean over sources and, when the runs
    have several sources, each of them (per-language laws)."""
    sources = sources_of(records)
    if source is not None:
        if source != ALL and source not in sources:
            raise ScalingError(
                f"--source {source!r}: the runs share validation losses for "
                f"{', '.join(sources) or 'no source'} (or 'all', their mean)"
            )
        return {source: points_from_runs(records, source)}
    groups = {ALL: points_from_runs(records, ALL)}
    if len(sources) > 1:
        for s in sources:
            groups[s] = points_from_runs(records, s)
    return groups


def groups_from_table(points: list[Point], source: str | None = None) -> dict[str, list]:
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(p.source, []).append(p)
    if source is not None:
        if source not in groups:
            raise ScalingError(
                f"--source {source!r}: the table's sources are {', '.join(repr(s) for s in groups)}"
            )
        return {source: groups[source]}
    return groups


def verdict(eff: Any, n: float, law: str = "chinchilla") -> str:
    """'performs like a 1.2M model [0.9M, 1.6M], 1.5x its size' (or why there is none)."""
    if not eff.finite:
        if law == "floor":
            return (
                "below the law's floor E: no finite model size reaches this loss (the law "
                "underestimates it)"
            )
        return (
            "below the law's floor E + B/D^beta for its D: no finite model size reaches "
            "this loss on these tokens (the law underestimates it)"
        )
    if math.isnan(eff.value):
        return "no effective size (the fitted law does not decrease with N)"
    note = (
        f" (no finite size in {eff.infinite_fraction:.1%} of the resamples)"
        if eff.infinite_fraction
        else ""
    )
    return (
        f"performs like a {fmt_count(eff.value)}-parameter model "
        f"[{fmt_count(eff.low)}, {fmt_count(eff.high)}], {eff.value / n:.2g}x its size{note}"
    )


def format_report(fits: list[GroupFit], what: str) -> str:
    lines = []
    for g in fits:
        f = g.fit
        name = LAW_NAMES[f.law]
        label = {ALL: "mean over sources", "": "all points"}.get(g.source, f"source {g.source}")
        lines.append(
            f"{name} law ({g.why}) on {len(f.points)} {what}, loss: {label}; "
            f"N = {PARAMETER_COUNT} parameters"
            + (", D = training tokens" if f.law == "chinchilla" else "")
        )
        lines.extend(_fit_lines(f, "the loss"))
        lines.append(f"  {'run':34s} {'N':>8s} {'D':>8s} {'loss':>7s} {'pred':>7s}  effective size")
        pred = f.predict(*_nd(f))
        for p, eff, lp in zip(f.points, g.effective, pred, strict=True):
            lines.append(
                f"  {p.name[:34]:34s} {fmt_count(p.n):>8s} {fmt_count(p.d):>8s} "
                f"{p.loss:7.4f} {lp:7.4f}  {verdict(eff, p.n, f.law)}"
            )
        lines.append("")
    return "\n".join(lines).rstrip()


def _fit_lines(f: Fit, of_what: str) -> list[str]:
    """The formula, parameters with intervals, residuals and notes of a fit."""
    lines = [f"  {f.formula()}"]
    for key, value in f.params.items():
        iv = f.intervals.get(key)
        span = f"  [{iv.low:.4g}, {iv.high:.4g}]" if iv else ""
        lines.append(f"  {key:8s} {value:12.5g}{span}")
    resamples = 0 if f.samples is None else len(f.samples)
    rms = float((f.residuals() ** 2).mean() ** 0.5)
    lines.append(
        f"  {f.confidence:.0%} percentile bootstrap intervals over {resamples} resamples "
        f"of the points; residual rms {rms:.2%} of {of_what}"
    )
    if len(f.points) == len(f.intervals) or len(f.points) == len(f.params):
        lines.append(
            "  note: as many points as parameters: the fit is exact, the intervals say little"
        )
    if f.at_bounds():
        lines.append(
            f"  note: {', '.join(f.at_bounds())} at the edge of the search box: the points "
            f"do not determine {'it' if len(f.at_bounds()) == 1 else 'them'} (more sizes "
            f"or token budgets would)"
        )
    return lines


def report_json(fits: list[GroupFit]) -> list[dict[str, Any]]:
    out = []
    for g in fits:
        f = g.fit
        pred = f.predict(*_nd(f))
        res = f.residuals()
        body = f.to_json()
        body.update(source=g.source, why=g.why, at_bounds=f.at_bounds())
        body["runs"] = [
            {
                "name": p.name,
                "N": p.n,
                "D": p.d,
                "loss": p.loss,
                "predicted": float(lp),
                "residual_log": float(r),
                "effective_size": eff.to_json(),
            }
            for p, eff, lp, r in zip(f.points, g.effective, pred, res, strict=True)
        ]
        out.append(body)
    return out


def _nd(f: Fit):
    import numpy as np

    n = np.array([p.n for p in f.points], dtype=float)
    d = np.array([p.d for p in f.points], dtype=float) if f.law == "chinchilla" else None
    return n, d


# --- few-shot scores (yoto eval): final scores, their fit, effective size by score --------

VAL_LOSS = "val_loss"  # --metric's default: the validation loss
EVAL_PREFIX = "eval:"

# Which way each few-shot metric is better, and what is fitted (the one place that says):
#   error  1 - score, for a share in [0, 1] that rises with N: the error falls with N
#   log    log(score), for a perplexity: the cross-entropy it exponentiates, a loss
#   value  the score itself, already a loss (bits per byte)
SCORE_METRICS: dict[str, tuple[bool, str]] = {  # metric -> (higher is better, fitted as)
    "acc": (True, "error"),
    "acc_norm": (True, "error"),
    "exact_match": (True, "error"),
    "perplexity": (False, "log"),
    "word_perplexity": (False, "log"),
    "byte_perplexity": (False, "log"),
    "bits_per_byte": (False, "value"),
}


@dataclass(frozen=True)
class ScoreMetric:
    """A few-shot metric of one task, and how it is fitted (``SCORE_METRICS``)."""

    task: str
    metric: str
    higher_is_better: bool
    fitted: str  # "error", "log" or "value"

    @property
    def key(self) -> str:  # RunRecord.scores' key
        return f"{self.task}/{self.metric}"

    @property
    def label(self) -> str:
        return f"{EVAL_PREFIX}{self.key}"

    @property
    def quantity(self) -> str:
        """What the law is fitted to, as its formula names it."""
        return {"error": "err", "log": f"log {self.metric}"}.get(self.fitted, self.metric)

    def describe(self) -> str:
        how = {
            "error": f"err = 1 - {self.metric}",
            "log": f"log {self.metric}, like a loss",
            "value": f"{self.metric} itself, like a loss",
        }[self.fitted]
        return f"{'higher' if self.higher_is_better else 'lower'} is better; fitted as {how}"

    def fitted_value(self, score: float) -> tuple[float | None, str]:
        """The quantity fitted for ``score``, or None and why a run with it is skipped."""
        if not math.isfinite(score):
            return None, f"{self.metric} is {score}"
        if self.fitted == "error":
            if not -1e-9 <= score <= 1 + 1e-9:
                return None, f"{self.metric} = {score:g} is not a share in [0, 1]"
            if score >= 1 - 1e-12:
                return None, f"{self.metric} = 1: an error of 0 is on no power law"
            return 1.0 - max(score, 0.0), ""
        if self.fitted == "log":
            if score <= 1:
                return None, f"{self.metric} = {score:g} <= 1 has no positive log"
            return math.log(score), ""
        if score <= 0:
            return None, f"{self.metric} = {score:g} is not positive"
        return score, ""

    def to_score(self, y: Any) -> Any:
        """Inverse of ``fitted_value``: the score the law predicts (numbers or arrays)."""
        if self.fitted == "error":
            return 1.0 - y
        if self.fitted == "log":
            import numpy as np

            return np.exp(y)
        return y


def parse_metric(spec: str | None, higher_is_better: bool | None = None) -> ScoreMetric | None:
    """``--metric``: None for the validation loss (``val_loss``, the default), else the
    few-shot metric ``eval:TASK/METRIC``. ``higher_is_better`` is the direction of a metric
    ``SCORE_METRICS`` does not know (True: 1 - score is fitted; False: the score itself)."""
    if spec is None or spec.strip() in ("", VAL_LOSS):
        return None
    spec = spec.strip()
    task, sep, metric = spec[len(EVAL_PREFIX) :].rpartition("/")
    if not spec.startswith(EVAL_PREFIX) or not sep or not task or not metric:
        raise ScalingError(
            f"--metric {spec!r}: expected {VAL_LOSS} (the default) or eval:TASK/METRIC, "
            "a few-shot score yoto eval recorded, e.g. eval:stdlib_next_line/acc_norm"
        )
    known = SCORE_METRICS.get(metric)
    if known is None:
        if higher_is_better is None:
            higher = ", ".join(m for m, (h, _) in SCORE_METRICS.items() if h)
            lower = ", ".join(m for m, (h, _) in SCORE_METRICS.items() if not h)
            raise ScalingError(
                f"--metric {spec!r}: which way is {metric!r} better? Known metrics: "
                f"{higher} (higher is better), {lower} (lower is better); for another say "
                "--higher-is-better (a share in [0, 1]: 1 - score is fitted) or "
                "--lower-is-better (the score itself is fitted like a loss)"
            )
        return ScoreMetric(task, metric, higher_is_better, "error" if higher_is_better else "value")
    if higher_is_better is not None and higher_is_better != known[0]:
        flag = "--higher-is-better" if higher_is_better else "--lower-is-better"
        raise ScalingError(
            f"--metric {spec!r}: {metric} is {'higher' if known[0] else 'lower'} is better; "
            f"drop {flag}"
        )
    return ScoreMetric(task, metric, *known)


@dataclass(frozen=True)
class Score:
    """A run's final few-shot score for one task and metric (see the module docstring)."""

    value: float
    step: int
    attempt: int
    d: float | None  # yoto_tokens_total at that step; None when the metrics lack it
    stderr: float | None = None
    num_fewshot: int | None = None
    limit: int | None = None


def final_scores(path: str | Path) -> dict[str, Score]:
    """Each ``task/metric`` of a run's evals/ table: the row of the newest step, ties to
    the highest attempt, then to the row written last; empty without evaluations."""
    best: dict[str, dict[str, Any]] = {}
    for row in _eval_rows(path):  # by (attempt, step), then as written
        value = row.get("value")
        if not row.get("task") or not row.get("metric") or value is None:
            continue
        key = f"{row['task']}/{row['metric']}"
        old = best.get(key)
        if old is None or (row["step"], row["attempt"]) >= (old["step"], old["attempt"]):
            best[key] = row
    tokens = _tokens_at(path, {(int(r["attempt"]), int(r["step"])) for r in best.values()})
    return {
        key: Score(
            value=float(r["value"]),
            step=int(r["step"]),
            attempt=int(r["attempt"]),
            d=tokens.get((int(r["attempt"]), int(r["step"]))),
            stderr=_finite_or_none(r.get("stderr")),
            num_fewshot=r.get("num_fewshot"),
            limit=r.get("limit"),
        )
        for key, r in sorted(best.items())
    }


_EVAL_SEGMENT = re.compile(r"^part-a\d+-s\d+(?:-(\d+))?\.parquet$")


def _eval_rows(path: str | Path) -> list[dict[str, Any]]:
    """``runstore.read_evals``'s rows, but rows of one (attempt, step) in the order they
    were written: ``append_records`` names a second file of a step ``...-1.parquet``, which
    sorts before the first by name."""
    runstore.require_run_dir(path)
    rows = []
    for file in runstore.segment_files(path, runstore.EVALS):
        match = _EVAL_SEGMENT.match(file.name)
        written = int(match.group(1) or 0) if match else 0
        try:
            table = pq.read_table(file)
        except (OSError, pa.ArrowInvalid) as exc:
            print(f"warning: skipping unreadable segment {file}: {exc}", file=sys.stderr)
            continue
        rows.extend((written, i, row) for i, row in enumerate(table.to_pylist()))
    rows.sort(key=lambda t: (t[2].get("attempt", 0), t[2].get("step", 0), t[0], t[1]))
    return [row for _, _, row in rows]


def _tokens_at(path: str | Path, wanted: set[tuple[int, int]]) -> dict[tuple[int, int], float]:
    """``yoto_tokens_total`` at each (attempt, step): the row of that step on the highest
    attempt up to the given one. Reads only the three columns, of the segments that can
    hold them."""
    if not wanted:
        return {}
    last_attempt = max(a for a, _ in wanted)
    last_step = max(s for _, s in wanted)
    steps = {s for _, s in wanted}
    columns = ["attempt", "step", catalog.TOKENS.name]
    found: dict[tuple[int, int], float] = {}
    for file in runstore.segment_files(path):
        span = runstore.segment_span(file.name)
        if span is not None and (span[0] > last_attempt or span[1] > last_step):
            continue
        try:
            if catalog.TOKENS.name not in pq.read_schema(file).names:
                continue
            table = pq.read_table(file, columns=columns)
        except (OSError, pa.ArrowInvalid) as exc:
            print(f"warning: skipping unreadable segment {file}: {exc}", file=sys.stderr)
            continue
        for a, s, tok in zip(*(table.column(c).to_pylist() for c in columns), strict=True):
            if s in steps and tok is not None and math.isfinite(tok):
                found[(a, s)] = float(tok)
    out = {}
    for a, s in wanted:
        on_line = [b for b, t in found if t == s and b <= a]
        if on_line:
            out[(a, s)] = found[(max(on_line), s)]
    return out


def _finite_or_none(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def score_labels(records: list[RunRecord]) -> list[str]:
    """Every ``eval:TASK/METRIC`` some run has a final score for."""
    return sorted({f"{EVAL_PREFIX}{key}" for r in records for key in r.scores})


@dataclass
class ScoreFit:
    """A law fitted to a few-shot score, and each fitted run's effective size by score
    beside the one by its validation loss (``loss_fit``, over every run with a loss)."""

    metric: ScoreMetric
    fit: Fit
    why: str
    runs: list[RunRecord]  # the fitted runs, in the order of fit.points
    scores: list[Score]
    effective: list[EffectiveSize]  # by score
    skipped: list[tuple[RunRecord, str]]
    loss_fit: Fit | None = None
    loss_why: str = ""
    loss_source: str = ALL
    loss_effective: list[EffectiveSize | None] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        """One row per fitted run: what the CLI's table and the explorer's show."""
        pred = self.metric.to_score(self.fit.predict(*_nd(self.fit)))
        out = []
        for r, s, p, eff, leff, ps in zip(
            self.runs, self.scores, self.fit.points, self.effective, self.loss_effective,
            pred, strict=True,
        ):  # fmt: skip
            out.append(
                {
                    "name": p.name,
                    "path": str(r.path),
                    "N": r.n,
                    "D": s.d,
                    "step": s.step,
                    "attempt": s.attempt,
                    "loss": r.loss(self.loss_source),
                    "effective_size_by_loss": leff,
                    "score": s.value,
                    "stderr": s.stderr,
                    "num_fewshot": s.num_fewshot,
                    "limit": s.limit,
                    "fitted_value": p.loss,
                    "predicted_score": float(ps),
                    "effective_size": eff,
                }
            )
        return out


def fit_scores(
    records: list[RunRecord],
    metric: ScoreMetric,
    law: str = "auto",
    bootstrap: int = 200,
    seed: int = 0,
    loss_source: str = ALL,
) -> ScoreFit:
    """Fit ``metric``'s final score (``fitted_value``) against N over the runs that have
    it; the others are skipped with the reason. ``law`` auto: for an error the floor law
    from enough runs (``choose_error_law``), for a loss-like metric what the loss would
    get (``choose_law``). The validation loss (``loss_source``) is fitted with auto over
    every run that has one, for the effective size by loss; without such a fit the
    report says why (``loss_why``)."""
    if not any(metric.key in r.scores for r in records):
        found = score_labels(records)
        raise ScalingError(
            f"no run has {metric.label}; "
            + (
                f"the runs' few-shot scores: {', '.join(found)}"
                if found
                else f"none of these {len(records)} run(s) has evaluations "
                f"(yoto eval RUN_DIR --tasks {metric.task} records them)"
            )
        )
    kept: list[tuple[RunRecord, Score, Point]] = []
    skipped: list[tuple[RunRecord, str]] = []
    for r in records:
        s = r.scores.get(metric.key)
        if s is None:
            have = ", ".join(r.scores) or "no evaluations"
            skipped.append((r, f"no {metric.label} in its evals/ table (it has: {have})"))
            continue
        if r.n is None:
            skipped.append((r, "no non_embedding_parameters in its manifest"))
            continue
        y, why = metric.fitted_value(s.value)
        if y is None:
            skipped.append((r, why))
            continue
        if law == "chinchilla" and s.d is None:
            skipped.append((r, f"no {catalog.TOKENS.name} at step {s.step} (Chinchilla needs D)"))
            continue
        kept.append((r, s, Point(r.n, s.d, y, name=r.name or r.id, source=metric.label)))
    points = [p for _, _, p in kept]
    if law == "auto":
        choose = choose_error_law if metric.fitted == "error" else choose_law
        chosen, why = choose(points)
    else:
        chosen, why = law, "requested"  # type: ignore[assignment]
    try:
        result = fit_law(points, chosen, bootstrap=bootstrap, seed=seed, quantity=metric.quantity)
    except ScalingError as exc:
        left = "".join(f"\n  skipped {r.path}: {reason}" for r, reason in skipped)
        raise ScalingError(f"{metric.label} ({metric.describe()}): {exc}{left}") from None
    out = ScoreFit(
        metric=metric,
        fit=result,
        why=why,
        runs=[r for r, _, _ in kept],
        scores=[s for _, s, _ in kept],
        effective=[result.effective_size(p.loss, p.d) for p in points],
        skipped=skipped,
        loss_source=loss_source,
    )
    _add_loss_fit(out, records, bootstrap, seed)
    for what in ("num_fewshot", "limit"):
        seen = sorted({str(getattr(s, what)) for s in out.scores})
        if len(seen) > 1:
            out.notes.append(f"the runs were evaluated with different {what}: {', '.join(seen)}")
    return out


def _add_loss_fit(out: ScoreFit, records: list[RunRecord], bootstrap: int, seed: int) -> None:
    with_loss = [r for r in records if r.n and r.d and r.loss(out.loss_source) is not None]
    try:
        points = points_from_runs(with_loss, out.loss_source)
        out.loss_fit, out.loss_why = fit_points(points, "auto", bootstrap, seed)
    except ScalingError as exc:
        out.loss_why = f"no fit of the validation loss ({len(with_loss)} run(s) have one): {exc}"
        out.loss_effective = [None] * len(out.runs)
        return
    out.loss_effective = [
        out.loss_fit.effective_size(loss, r.d) if (loss := r.loss(out.loss_source)) else None
        for r in out.runs
    ]


def size_cell(eff: EffectiveSize | None, n: float | None, interval: bool = True) -> str:
    """'2.05M [1.8M, 2.3M] 2x' for a table; '-' when there is none."""
    if eff is None or math.isnan(eff.value):
        return "-"
    if not eff.finite:
        return "past the law's floor"
    span = f" [{fmt_count(eff.low)}, {fmt_count(eff.high)}]" if interval else ""
    ratio = f" {eff.value / n:.2g}x" if n else ""
    return f"{fmt_count(eff.value)}{span}{ratio}"


def format_score_report(sf: ScoreFit) -> str:
    f, m = sf.fit, sf.metric
    lines = [
        f"{LAW_NAMES[f.law]} law ({sf.why}) on {len(f.points)} runs, {m.label} "
        f"({m.describe()}); N = {PARAMETER_COUNT} parameters"
        + (", D = training tokens at the evaluated step" if f.law == "chinchilla" else "")
    ]
    lines.extend(_fit_lines(f, f.quantity))
    lines.extend(f"  note: {note}" for note in sf.notes)
    source = "mean over sources" if sf.loss_source == ALL else f"source {sf.loss_source}"
    if sf.loss_fit is not None:
        lf = sf.loss_fit
        lines.append(
            f"  by loss ({source}): {LAW_NAMES[lf.law]} law ({sf.loss_why}) on "
            f"{len(lf.points)} runs: {lf.formula()}"
        )
    else:
        lines.append(f"  by loss: {sf.loss_why}")
    lines.append(
        f"  {'run':24s} {'N':>8s} {'D':>8s} {'loss':>7s} {'N_eff(loss)':>18s} "
        f"{m.metric[:9]:>9s} {'law':>9s}  N_eff(score)"
    )
    rows = sf.rows()
    for row in rows:
        loss = f"{row['loss']:7.4f}" if row["loss"] is not None else f"{'-':>7s}"
        by_loss = size_cell(row["effective_size_by_loss"], row["N"], interval=False)
        lines.append(
            f"  {row['name'][:24]:24s} {fmt_count(row['N']):>8s} {fmt_count(row['D']):>8s} "
            f"{loss} {by_loss:>18s} {row['score']:9.4g} {row['predicted_score']:9.4g}  "
            f"{size_cell(row['effective_size'], row['N'])}"
        )
    lines.append(
        "  N_eff: the non-embedding N at which the law reaches the run's loss or score"
        + (" on its D" if f.law == "chinchilla" else "")
        + f"; [{f.confidence:.0%} bootstrap interval], x its size"
    )
    for row in rows:
        eff = row["effective_size"]
        if eff.finite and not math.isnan(eff.value):
            by_loss = row["effective_size_by_loss"]
            also = (
                f"; by loss like {fmt_count(by_loss.value)}"
                if by_loss is not None and by_loss.finite and not math.isnan(by_loss.value)
                else ""
            )
            lines.append(
                f"  {row['name']} performs like a {fmt_count(eff.value)}-parameter model on "
                f"{m.key} ({eff.value / row['N']:.2g}x its size){also}"
            )
        elif not eff.finite:
            lines.append(
                f"  {row['name']}: its {m.metric} is past the law's floor; no finite size "
                "reaches it (the law underestimates it)"
            )
    for r, reason in sf.skipped:
        lines.append(f"  skipped {r.name or r.id} ({r.path}): {reason}")
    return "\n".join(lines)


def score_report_json(sf: ScoreFit) -> dict[str, Any]:
    f = sf.fit
    body = f.to_json()
    body.update(
        metric=sf.metric.label,
        task=sf.metric.task,
        metric_name=sf.metric.metric,
        higher_is_better=sf.metric.higher_is_better,
        fitted=sf.metric.describe(),
        why=sf.why,
        at_bounds=f.at_bounds(),
        notes=sf.notes,
    )
    runs = []
    for row in sf.rows():
        by_loss = row.pop("effective_size_by_loss")
        eff = row.pop("effective_size").to_json()
        eff["fitted_value"] = eff.pop("loss")  # what the law was inverted at
        row.update(effective_size=eff, effective_size_by_loss=by_loss and by_loss.to_json())
        runs.append(row)
    body["runs"] = runs
    body["skipped"] = [
        {"name": r.name or r.id, "path": str(r.path), "reason": reason} for r, reason in sf.skipped
    ]
    if sf.loss_fit is not None:
        loss = sf.loss_fit.to_json()
        loss.update(source=sf.loss_source, why=sf.loss_why)
        body["loss_fit"] = loss
    else:
        body["loss_fit"] = None
        body["loss_note"] = sf.loss_why
    return body


__all__ = [
    "ALL",
    "SCORE_METRICS",
    "GroupFit",
    "Law",
    "RunRecord",
    "ScoreFit",
    "ScoreMetric",
    "check_runs",
    "fit_groups",
    "fit_scores",
    "format_report",
    "format_score_report",
    "groups_from_runs",
    "groups_from_table",
    "load_runs",
    "parse_metric",
    "read_run",
    "read_table",
    "report_json",
    "score_report_json",
]
