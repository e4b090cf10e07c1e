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
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yoto import catalog, runstore
from yoto.errors import RunDirError

from . import laws
from .laws import PARAMETER_COUNT, Fit, Law, Point, ScalingError, choose_law, fmt_count
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


def verdict(eff: Any, n: float) -> str:
    """'performs like a 1.2M model [0.9M, 1.6M], 1.5x its size' (or why there is none)."""
    if not eff.finite:
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
        name = {"kaplan": "Kaplan", "chinchilla": "Chinchilla"}[f.law]
        label = {ALL: "mean over sources", "": "all points"}.get(g.source, f"source {g.source}")
        lines.append(
            f"{name} law ({g.why}) on {len(f.points)} {what}, loss: {label}; "
            f"N = {PARAMETER_COUNT} parameters"
            + (", D = training tokens" if f.law == "chinchilla" else "")
        )
        lines.append(f"  {f.formula()}")
        for key, value in f.params.items():
            iv = f.intervals.get(key)
            span = f"  [{iv.low:.4g}, {iv.high:.4g}]" if iv else ""
            lines.append(f"  {key:8s} {value:12.5g}{span}")
        resamples = 0 if f.samples is None else len(f.samples)
        rms = float((f.residuals() ** 2).mean() ** 0.5)
        lines.append(
            f"  {f.confidence:.0%} percentile bootstrap intervals over {resamples} resamples "
            f"of the points; residual rms {rms:.2%} of the loss"
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
        lines.append(f"  {'run':34s} {'N':>8s} {'D':>8s} {'loss':>7s} {'pred':>7s}  effective size")
        pred = f.predict(*_nd(f))
        for p, eff, lp in zip(f.points, g.effective, pred, strict=True):
            lines.append(
                f"  {p.name[:34]:34s} {fmt_count(p.n):>8s} {fmt_count(p.d):>8s} "
                f"{p.loss:7.4f} {lp:7.4f}  {verdict(eff, p.n)}"
            )
        lines.append("")
    return "\n".join(lines).rstrip()


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


__all__ = [
    "ALL",
    "GroupFit",
    "Law",
    "RunRecord",
    "check_runs",
    "fit_groups",
    "format_report",
    "groups_from_runs",
    "groups_from_table",
    "load_runs",
    "read_run",
    "read_table",
    "report_json",
]
