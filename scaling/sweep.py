"""``yoto sweep``: a Cartesian grid of ordinary runs, one after another, tagged as one sweep.

Each grid point is ``yoto train`` with the point's values added as ``--set`` overrides
(after the sweep's own ``--set``), so every run is an ordinary run directory; its manifest
also holds ``sweep: {id, index, size, point, budget, target_tokens}`` and, as every run's
does, ``non_embedding_parameters``.

Budgets (the number of training tokens D each run gets; steps = D / tokens per step, with
tokens per step = train.global_batch_size x model.seq_len):

* ``equal-tokens`` (default): every run gets ``--tokens`` tokens, or, without it, as many
  as the base config's train.steps give at its batch and context. Fit with Kaplan's L(N).
* ``compute-optimal``: D = ``--tokens-per-param`` (default 20, Chinchilla's ratio) x the
  point's non-embedding parameters: model size and data grow together, as in Hoffmann et
  al.'s compute-optimal frontier.
* ``steps``: train.steps as configured (by ``--set`` or the grid, e.g.
  ``--grid train.steps=200,400``): the runs differ in N and D on purpose, which is what the
  Chinchilla L(N, D) fit needs.

A batch warmup (train.batch_warmup) makes the first steps smaller, so a run's real D is a
little under its target; the fits read the tokens each run actually recorded.
"""

from __future__ import annotations

import itertools
import logging
import math
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from yoto import config as config_mod
from yoto.errors import ConfigError
from yoto.trainer.model import non_embedding_parameters

log = logging.getLogger("yoto.scaling.sweep")

BUDGETS = ("equal-tokens", "compute-optimal", "steps")


@dataclass
class SweepPoint:
    index: int
    values: dict[str, Any]  # grid key -> value (parsed YAML)
    overrides: list[str]  # the --set items of this run (sweep's, the point's, the budget's)
    cfg: config_mod.Config
    non_embedding_parameters: int
    tokens_per_step: int
    steps: int

    @property
    def target_tokens(self) -> int:
        return self.steps * self.tokens_per_step

    def label(self) -> str:
        return " ".join(f"{k}={_text(v)}" for k, v in self.values.items())


@dataclass
class SweepPlan:
    id: str
    base_name: str
    budget: str
    points: list[SweepPoint]
    tokens_per_param: float | None = None

    def tag(self, point: SweepPoint) -> dict[str, Any]:
        tag = {
            "id": self.id,
            "index": point.index,
            "size": len(self.points),
            "point": point.values,
            "budget": self.budget,
            "target_tokens": point.target_tokens,
        }
        if self.tokens_per_param is not None:
            tag["tokens_per_param"] = self.tokens_per_param
        return tag


# --- the grid -----------------------------------------------------------------------------


def leaf_fields(model: type[BaseModel] = config_mod.Config, prefix: str = "") -> list[str]:
    """Every settable field path of the config: model.n_layer, train.batch_warmup.start, ..."""
    out = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        path = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(leaf_fields(ann, path + "."))
        else:
            out.append(path)
    return out


def resolve_key(key: str) -> str:
    """A full field path as given; a bare field name (``position``) when exactly one
    section has a field of that name (``model.position``). Unknown paths fail here, with
    the fields of the section they name."""
    fields = leaf_fields()
    if "." in key:
        if key in fields or key.startswith("deepspeed."):  # deepspeed: free-form, merged last
            return key
        import difflib

        parent, _, leaf = key.rpartition(".")
        # the fields and subsections directly under the parent, in declaration order
        under = [f[len(parent) + 1 :].split(".")[0] for f in fields if f.startswith(parent + ".")]
        siblings = list(dict.fromkeys(under))
        if not siblings:
            sections = sorted({f.split(".")[0] for f in fields if "." in f})
            raise ConfigError(
                f"--grid {key}=...: unknown field {key!r}: there is no section {parent!r}; "
                f"sections: {', '.join(sections)}"
            )
        close = difflib.get_close_matches(leaf, siblings, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"--grid {key}=...: unknown field {key!r}{hint}; fields of {parent}: "
            f"{', '.join(siblings)}"
        )
    if key in fields:  # top-level values: faults, deepspeed
        return key
    matches = [f for f in fields if f.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(
            f"--grid {key}=...: {key!r} is a field of several sections "
            f"({', '.join(matches)}); give the full name"
        )
    import difflib

    close = difflib.get_close_matches(key, [f.rsplit(".", 1)[-1] for f in fields], n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise ConfigError(
        f"--grid {key}=...: no config field is named {key!r}{hint}; give section.field, "
        f"e.g. model.n_layer (see 'yoto config' for every field)"
    )


def split_values(text: str) -> list[str]:
    """Comma-separated values; commas inside [...] or {...} belong to a value (a list)."""
    values, depth, current = [], 0, []
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    values.append("".join(current).strip())
    return values


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``--grid key=v1,v2`` items as (full key, [value texts]), in the order given."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"--grid {item!r}: expected key=value1,value2,..., e.g. model.n_layer=2,4,6"
            )
        full = resolve_key(key)
        values = split_values(text)
        if any(v == "" for v in values):
            raise ConfigError(f"--grid {item!r}: an empty value (stray comma?)")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid {item!r}: a value is given twice")
        if any(k == full for k, _ in grid):
            raise ConfigError(f"--grid: {full} is given twice; put all its values in one --grid")
        grid.append((full, values))
    if not grid:
        raise ConfigError("a sweep needs at least one --grid key=v1,v2,...")
    return grid


# --- the plan -----------------------------------------------------------------------------


def plan(
    grid_items: list[str],
    preset: str | None = None,
    file: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    budget: str = "equal-tokens",
    tokens: int | None = None,
    tokens_per_param: float = 20.0,
    name: str | None = None,
) -> SweepPlan:
    """Validate every point's config and derive its budget; nothing is trained or written.
    A bad key or value fails here, naming the point."""
    if budget not in BUDGETS:
        raise ConfigError(f"--budget {budget!r}: budgets are {', '.join(BUDGETS)}")
    if tokens is not None and budget != "equal-tokens":
        raise ConfigError("--tokens sets an equal-token budget; use it with --budget equal-tokens")
    if tokens is not None and tokens < 1:
        raise ConfigError(f"--tokens must be >= 1, got {tokens}")
    if tokens_per_param <= 0:
        raise ConfigError(f"--tokens-per-param must be > 0, got {tokens_per_param}")
    grid = parse_grid(grid_items)
    if budget != "steps" and any(k == "train.steps" for k, _ in grid):
        raise ConfigError(
            f"--grid train.steps=... sets each run's length, but --budget {budget} derives "
            f"it; use --budget steps to train the steps the grid gives"
        )
    base = config_mod.load_config(preset=preset, file=file, overrides=list(overrides))
    base_tokens = tokens or base.train.steps * _tokens_per_step(base)

    points = []
    for index, combo in enumerate(itertools.product(*(values for _, values in grid))):
        point_sets = [f"{k}={v}" for (k, _), v in zip(grid, combo, strict=True)]
        where = " ".join(point_sets)
        try:
            cfg = config_mod.load_config(
                preset=preset, file=file, overrides=[*overrides, *point_sets]
            )
        except ConfigError as exc:
            raise ConfigError(f"sweep point {index} ({where}): {exc}") from None
        values = {k: _value(cfg, k) for k, _ in grid}
        n = non_embedding_parameters(cfg)
        per_step = _tokens_per_step(cfg)
        if budget == "equal-tokens":
            steps = max(1, round(base_tokens / per_step))
        elif budget == "compute-optimal":
            steps = max(1, math.ceil(tokens_per_param * n / per_step))
        else:
            steps = cfg.train.steps
        run_sets = [*overrides, *point_sets]
        if budget != "steps":
            run_sets.append(f"train.steps={steps}")
            cfg = config_mod.load_config(preset=preset, file=file, overrides=run_sets)
        points.append(SweepPoint(index, values, run_sets, cfg, n, per_step, steps))
    stem = name or (Path(file).stem if file else preset or "sweep")
    sweep_id = f"sweep-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"
    return SweepPlan(
        sweep_id,
        stem,
        budget,
        points,
        tokens_per_param if budget == "compute-optimal" else None,
    )


def _tokens_per_step(cfg: config_mod.Config) -> int:
    return cfg.train.global_batch_size * cfg.model.seq_len


def _value(cfg: config_mod.Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node.model_dump(mode="json") if isinstance(node, BaseModel) else node


def _text(value: Any) -> str:
    return str(value).replace(" ", "")


def run_name(plan_: SweepPlan, point: SweepPoint) -> str:
    parts = [f"{k.rsplit('.', 1)[-1]}{_text(v)}" for k, v in point.values.items()]
    return f"{plan_.base_name}-{point.index:02d}-" + "-".join(parts)


# --- running ------------------------------------------------------------------------------


def describe(plan_: SweepPlan) -> str:
    lines = [
        f"sweep {plan_.id}: {len(plan_.points)} runs, budget {plan_.budget}"
        + (
            f" ({plan_.tokens_per_param:g} tokens per non-embedding parameter)"
            if plan_.tokens_per_param
            else ""
        )
    ]
    for p in plan_.points:
        lines.append(
            f"  [{p.index}] {p.label():40s} N={p.non_embedding_parameters:,} "
            f"(non-embedding)  steps={p.steps}  tokens={p.target_tokens:,}"
        )
    return "\n".join(lines)


def run(
    plan_: SweepPlan,
    run_root: str | Path,
    progress: bool = False,
    argv: list[str] | None = None,
    live: Callable[[config_mod.Config], list[Any]] | None = None,
    evaluator: Callable[[config_mod.Config], Any] | None = None,
) -> list[dict[str, Any]]:
    """Train the points in order. A point that fails is recorded and the sweep goes on
    (the others are still worth having); Ctrl-C stops the sweep. ``live(cfg)`` makes a
    point's live sinks (``yoto train``'s exporter and notifier): the points serve
    ``/metrics`` one after another on the same address, told apart by ``yoto_run_info``.
    ``evaluator`` is ``yoto train``'s background few-shot evaluator (eval.harness), so a
    sweep's points get the scores the downstream scaling fit reads."""
    from yoto.trainer.run import train  # heavy imports only when training

    results = []
    for point in plan_.points:
        cfg = point.cfg.model_copy(deep=True)
        cfg.log.progress = progress
        print(
            f"[{point.index + 1}/{len(plan_.points)}] {point.label()}: "
            f"N={point.non_embedding_parameters:,}, {point.steps} steps",
            file=sys.stderr,
        )
        entry: dict[str, Any] = {"index": point.index, "point": point.values}
        try:
            run_dir, status = train(
                cfg,
                run_root=run_root,
                name=run_name(plan_, point),
                argv=argv,
                live=(lambda cfg=cfg: live(cfg)) if live is not None else None,
                manifest_extra={"sweep": plan_.tag(point)},
                evaluator=evaluator,
            )
            entry.update(status=status, run_dir=str(run_dir))
        except Exception as exc:  # one bad point must not lose the others
            log.error("sweep point %d (%s) failed: %s", point.index, point.label(), exc)
            entry.update(status="failed", error=str(exc))
        results.append(entry)
    return results
