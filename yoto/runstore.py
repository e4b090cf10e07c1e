"""The run directory: the durable, post-mortem record of one run.

::

    runs/<run-id>/
      manifest.json        id, name, status, start/end, versions, host, git sha, summary
      config.yaml          resolved config, secrets redacted
      metrics/*.parquet    wide, one row per (attempt, step); columns are series keys
      events.jsonl         one JSON object a line, appended and fsync'd
      checkpoints/step-N/  DeepSpeed checkpoint + COMPLETE marker (yoto.trainer.checkpoint)

Every file a reader may open is complete: Parquet segments and the manifest are written to
a temporary name, fsync'd and renamed; events are whole lines, fsync'd one by one. Only
rank 0 writes. Readers (the CLI, the Streamlit explorer, DuckDB) need nothing else.

Rows are buffered (``flush_every_steps`` / ``flush_every_seconds``) and always flushed
before a checkpoint is saved, so a crash loses at most the rows after the newest
checkpoint, which the resume from it trains again. A step recorded twice is told apart by
its attempt: a resume whose checkpoint is older than rows already on disk replays those
steps as a new attempt (as a rollback does), so readers see each (attempt, step) once.
:func:`find_gaps` says which steps have no row.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from yoto import __version__, catalog
from yoto.errors import RunDirError
from yoto.events import Event

log = logging.getLogger("yoto.runstore")

MANIFEST = "manifest.json"
CONFIG = "config.yaml"
EVENTS = "events.jsonl"
METRICS = "metrics"
LAYERS = "layers"  # long: attempt, step, layer, metric, value
SPECTRA = "spectra"  # long: attempt, step, layer, alpha, ... (yoto.probes.spectra)
CHECKPOINTS = "checkpoints"
EVALS = "evals"  # long: attempt, step, task, metric, value, stderr, ... (yoto.evals)
CHAT = "chat.jsonl"  # the chat notifier's outbox: each message, where it went, how it ended
COMPLETE = "COMPLETE"  # written last into a checkpoint folder (yoto.trainer.checkpoint)
_TAG = re.compile(r"^step-(\d+)$")

STATUSES = ("running", "finished", "halted", "crashed", "interrupted")
HEARTBEAT_SECONDS = 30.0  # the manifest's 'updated' is at most this old while a run lives
STALE_AFTER_BEATS = 4  # a 'running' run not updated for this many heartbeats is stale
_ROW_KEYS = ("attempt", "step", "time")


# --- small durable-write helpers ----------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    with contextlib.suppress(OSError):  # some filesystems refuse to open directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` so that a reader sees either the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


# --- writer -------------------------------------------------------------------------------


def new_run_id(name: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "run"
    return f"{stamp}-{slug}-{secrets.token_hex(2)}"


def environment_info() -> dict[str, Any]:
    """Versions and host recorded in the manifest (imports nothing heavy it did not have)."""
    versions = {"yoto": __version__, "python": platform.python_version()}
    for module in ("torch", "deepspeed", "pyarrow", "pydantic"):
        mod = sys.modules.get(module)
        versions[module] = getattr(mod, "__version__", None) if mod else None
    return {
        "versions": versions,
        "host": socket.gethostname(),
        "pid": os.getpid(),  # with host: whether a 'running' run's writer is still alive
        "git": _git_info(),
    }


def _git_info() -> dict[str, Any] | None:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return {"sha": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


class RunStore:
    """Writes one run directory. Implements :class:`yoto.events.Sink`.

    While the run is open a heartbeat thread rewrites the manifest's ``updated`` time every
    ``heartbeat_seconds`` (also during a long checkpoint or evaluation), so a reader can
    tell a live run from one whose process died without a word (:func:`liveness`)."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        flush_every_steps: int = 50,
        flush_every_seconds: float = 30.0,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
    ) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.manifest["heartbeat_seconds"] = heartbeat_seconds
        self.flush_every_steps = flush_every_steps
        self.flush_every_seconds = flush_every_seconds
        self.previous_status: str | None = None  # set by reopen(): the status before resume
        self._rows: list[dict[str, float]] = []
        self._layer_rows: list[tuple[int, int, str, str, float]] = []
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()  # events file
        self._manifest_lock = threading.RLock()  # the manifest dict and its file
        (self.path / METRICS).mkdir(parents=True, exist_ok=True)
        (self.path / CHECKPOINTS).mkdir(exist_ok=True)
        self._events = open(self.path / EVENTS, "a+", encoding="utf-8")  # noqa: SIM115
        _end_cut_line(self._events.fileno())
        self._closed = threading.Event()
        self._heartbeat = threading.Thread(
            target=self._beat, args=(heartbeat_seconds,), name="yoto-heartbeat", daemon=True
        )
        self._heartbeat.start()

    @classmethod
    def create(
        cls,
        root: str | Path,
        name: str,
        config_yaml: str,
        extra: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> RunStore:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        run_id = new_run_id(name)
        path = root / run_id
        path.mkdir()
        now = time.time()
        manifest = {
            "id": run_id,
            "name": name,
            "status": "running",
            "start": now,
            "end": None,
            "updated": now,
            **environment_info(),
            **dict(extra or {}),
            "heartbeat_seconds": kwargs.get("heartbeat_seconds", HEARTBEAT_SECONDS),
            "summary": {},
        }
        atomic_write_bytes(path / CONFIG, config_yaml.encode())
        atomic_write_json(path / MANIFEST, manifest)
        fsync_dir(root)
        return cls(path, manifest, **kwargs)

    @classmethod
    def reopen(
        cls, path: str | Path, extra: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> RunStore:
        """Continue writing an existing run (resume): status back to running."""
        path = Path(path)
        manifest = read_manifest(path)
        previous_status = manifest.get("status", "crashed")
        manifest.update(environment_info())
        manifest.update(dict(extra or {}))
        manifest["status"] = "running"
        manifest["end"] = None
        manifest["resumes"] = int(manifest.get("resumes", 0)) + 1
        store = cls(path, manifest, **kwargs)
        store.previous_status = previous_status
        store._write_manifest()
        return store

    # Sink protocol

    def write_step(self, attempt: int, step: int, values: Mapping[str, float]) -> None:
        """One wide row per step; series labelled by ``layer`` go to the long layers/
        table instead (a 96-layer model would otherwise make thousands of columns)."""
        row = {"attempt": attempt, "step": step, "time": time.time()}
        for key, value in values.items():
            if "{" in key:
                name, labels = _split_key(key)
                if "layer" in labels:
                    self._layer_rows.append((attempt, step, labels["layer"], name, value))
                    continue
            row[key] = value
        self._rows.append(row)
        due = time.monotonic() - self._last_flush >= self.flush_every_seconds
        if len(self._rows) >= self.flush_every_steps or due:
            self.flush()

    def write_event(self, event: Event) -> None:
        line = json.dumps(event.to_json(), default=_json_default, allow_nan=True)
        with self._lock:
            self._events.write(line + "\n")
            self._events.flush()
            os.fsync(self._events.fileno())

    def flush(self) -> None:
        """Write the buffered rows as one Parquet segment (atomically) and the manifest."""
        rows, self._rows = self._rows, []
        layer_rows, self._layer_rows = self._layer_rows, []
        self._last_flush = time.monotonic()
        for part in _runs_of_attempt(rows, lambda r: r["attempt"]):
            self._write_segment(part)
        for part in _runs_of_attempt(layer_rows, lambda r: r[0]):
            self._write_layer_segment(part)
        with self._manifest_lock:
            if rows:
                self._summarise(rows)
        self._write_manifest()

    def write_records(
        self, table: str, attempt: int, step: int, rows: list[Mapping[str, Any]]
    ) -> None:
        """Rows of a long table (e.g. spectra/) describing ``step``, written at once."""
        append_records(self.path, table, attempt, step, rows)

    def mark_ended(self, status: str, if_running: bool = False) -> None:
        """Write how the run ended to the manifest at once: the first thing on any way out
        (a launcher's SIGKILL may follow its SIGTERM within seconds), before buffered rows,
        checkpoints or chat are handed in. ``if_running``: only if no end is written yet
        (a signal's 'interrupted' never replaces a 'crashed' already there)."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {STATUSES}")
        with self._manifest_lock:  # the check and the write are one step
            if if_running and self.manifest.get("status") != "running":
                return
            self.update_manifest(status=status, end=time.time())

    def close(self, status: str) -> None:
        """End the record: the status first, then the buffered rows, then the events file.
        A full disk loses what does not fit, said in one log line each, never the rest."""
        self._closed.set()
        for what, write in (
            ("the final status", lambda: self.mark_ended(status)),
            ("the buffered metric rows", self.flush),
        ):
            try:
                write()
            except OSError as exc:
                log.error("could not write %s to %s: %s", what, self.path, exc.strerror or exc)
        with self._lock:
            self._events.close()

    def update_manifest(self, **fields: Any) -> None:
        with self._manifest_lock:
            self.manifest.update(fields)
        self._write_manifest()

    # internals

    def _write_segment(self, rows: list[dict[str, float]]) -> None:
        keys = list(_ROW_KEYS)
        for row in rows:
            keys.extend(k for k in row if k not in keys)
        columns = {
            "attempt": pa.array([r["attempt"] for r in rows], pa.int32()),
            "step": pa.array([r["step"] for r in rows], pa.int64()),
            "time": pa.array([r["time"] for r in rows], pa.float64()),
        }
        for key in keys[len(_ROW_KEYS) :]:
            columns[key] = pa.array([_float_or_none(r.get(key)) for r in rows], pa.float64())
        stem = _segment_stem(rows[0]["attempt"], rows[0]["step"], rows[-1]["step"])
        self._write_parquet(METRICS, stem, pa.table(columns))

    def _write_layer_segment(self, rows: list[tuple[int, int, str, str, float]]) -> None:
        attempt, step, layer, metric, value = zip(*rows, strict=True)
        table = pa.table(
            {
                "attempt": pa.array(attempt, pa.int32()),
                "step": pa.array(step, pa.int64()),
                "layer": pa.array(layer, pa.string()),
                "metric": pa.array(metric, pa.string()),
                "value": pa.array([_float_or_none(v) for v in value], pa.float64()),
            }
        )
        self._write_parquet(LAYERS, _segment_stem(attempt[0], step[0], step[-1]), table)

    def _write_parquet(self, folder: str, stem: str, table: pa.Table) -> Path:
        return write_parquet(self.path / folder, stem, table)

    def _summarise(self, rows: list[dict[str, float]]) -> None:
        summary = self.manifest.setdefault("summary", {})
        last = rows[-1]
        summary["attempt"] = last["attempt"]
        summary["last_step"] = last["step"]
        for metric in (catalog.TRAIN_LOSS, catalog.TOKENS, catalog.STEPS):
            for row in reversed(rows):
                if row.get(metric.name) is not None:
                    summary[metric.name] = _float_or_none(row[metric.name])
                    break
        val_last = summary.setdefault("val_loss", {})
        val_best = summary.setdefault("best_val_loss", {})
        for row in rows:
            for key, value in row.items():
                name, labels = _split_key(key)
                if name != catalog.VAL_LOSS.name or value is None or not math.isfinite(value):
                    continue
                source = labels.get("source", "")
                val_last[source] = value
                if source not in val_best or value < val_best[source]:
                    val_best[source] = value

    def _write_manifest(self) -> None:
        with self._manifest_lock:
            self.manifest["updated"] = time.time()
            atomic_write_json(self.path / MANIFEST, self.manifest)

    def _beat(self, seconds: float) -> None:
        while not self._closed.wait(seconds):
            # a full disk: the next flush says so on the training thread
            with contextlib.suppress(OSError):
                self._write_manifest()


def write_parquet(directory: Path, stem: str, table: pa.Table) -> Path:
    """Atomically add ``directory/stem.parquet``; never overwrite (append-only record)."""
    directory.mkdir(exist_ok=True)
    target = directory / f"{stem}.parquet"
    n = 1
    while target.exists():
        target = directory / f"{stem}-{n}.parquet"
        n += 1
    tmp = target.with_name(target.name + ".tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)
    fsync_dir(directory)
    return target


def append_records(
    run_dir: str | Path, table: str, attempt: int, step: int, rows: list[Mapping[str, Any]]
) -> Path | None:
    """Add rows describing ``step`` to a long table (spectra/...) of a run directory; also
    used by offline analyses of a finished run."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", table) or table in (METRICS, LAYERS, CHECKPOINTS):
        raise ValueError(f"{table!r} is not a records table name")
    if not rows:
        return None
    data = pa.Table.from_pylist([{"attempt": attempt, "step": step, **r} for r in rows])
    return write_parquet(Path(run_dir) / table, f"part-a{attempt:04d}-s{step:010d}", data)


def append_line(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line to a file of a run directory, durably, in one ``write`` (a
    writer appending to the same file from another handle never splits the line); for
    records written beside the run store, also after it closed (chat outcomes)."""
    line = json.dumps(record, default=_json_default, allow_nan=True) + "\n"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        _end_cut_line(fd)
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def _end_cut_line(fd: int) -> None:
    """Before appending to a file of lines (opened for appending) that a crash left with a
    last line cut mid-write: end that line, so the next one is not glued to it (readers
    then skip the fragment alone and name it)."""
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        os.write(fd, b"\n")


def _segment_stem(attempt: int, first: int, last: int) -> str:
    return f"part-a{attempt:04d}-s{first:010d}-{last:010d}"


# part-a{attempt}-s{first}-{last} (metrics, layers) or part-a{attempt}-s{step} (records);
# a trailing -N tells apart two writes of the same span
_SEGMENT = re.compile(r"^part-a(\d+)-s(\d+)(?:-(\d+))?(?:-\d+)?\.parquet$")


def segment_span(name: str) -> tuple[int, int, int] | None:
    """(attempt, first step, last step) that a segment's file name says, or None."""
    match = _SEGMENT.match(name)
    if not match:
        return None
    first = int(match.group(2))
    return int(match.group(1)), first, int(match.group(3) or first)


def _runs_of_attempt(rows: list[Any], attempt_of: Any) -> Iterator[list[Any]]:
    """Consecutive rows of one attempt: one segment each, so names say what they hold."""
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or attempt_of(rows[i]) != attempt_of(rows[start]):
            yield rows[start:i]
            start = i


def _split_key(key: str) -> tuple[str, dict[str, str]]:
    if key in _ROW_KEYS:
        return key, {}
    try:
        return catalog.parse_series_key(key)
    except ValueError:
        return key, {}


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    return str(obj)


def tag_for(step: int) -> str:
    return f"step-{step}"


@dataclass(frozen=True, order=True)
class CheckpointDir:
    step: int
    path: Path

    @property
    def tag(self) -> str:
        return self.path.name

    @property
    def complete(self) -> bool:
        return (self.path / COMPLETE).is_file()


def list_checkpoints(root: Path) -> list[CheckpointDir]:
    """Every step-N folder under ``root``, oldest first (complete or not)."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _TAG.match(child.name)
        if match and child.is_dir():
            found.append(CheckpointDir(int(match.group(1)), child))
    return sorted(found)


# --- readers ------------------------------------------------------------------------------


RUN_PARTS = (CONFIG, EVENTS, METRICS, CHECKPOINTS)  # what a run writes beside its manifest
DAMAGED = "damaged"  # the state of a run without a readable manifest


def is_run_dir(path: str | Path) -> bool:
    """What makes a folder a run directory: its manifest, or, when that is deleted, at least
    two of the other parts every run writes (``RUN_PARTS``): one alone (a config.yaml)
    could be anyone's. The single definition: readers of roots and of runs both ask here."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return True
    return path.is_dir() and sum((path / part).exists() for part in RUN_PARTS) >= 2


def require_run_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise _not_a_folder(path)
    if not is_run_dir(path):
        raise RunDirError(
            f"{str(path)!r} is not a run directory (no {MANIFEST}); "
            f"a run directory is created by 'yoto train' under --run-root"
        )
    return path


def _not_a_folder(path: Path) -> RunDirError:
    if not path.exists():
        return RunDirError(f"run directory {str(path)!r} does not exist")
    return RunDirError(f"{str(path)!r} is a file, not a run directory")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest; raises RunDirError naming the damage when it is missing or unreadable
    (:func:`manifest_damage` says the same without raising)."""
    manifest, damage = read_manifest_or_damage(path)
    if manifest is None:
        raise RunDirError(f"run directory {str(path)!r} is damaged: {damage}")
    return manifest


def read_manifest_or_damage(path: str | Path) -> tuple[dict[str, Any] | None, str]:
    """(manifest, "") or (None, what is wrong with it): for readers that show the rest of a
    run whose manifest is deleted or damaged."""
    file = require_run_dir(path) / MANIFEST
    if not file.is_file():
        return None, f"no {MANIFEST} (deleted, or never written)"
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"{MANIFEST} is not valid JSON: {exc}"
    except OSError as exc:
        return None, f"{MANIFEST} cannot be read: {exc.strerror or exc}"
    if not isinstance(manifest, dict):
        return None, f"{MANIFEST} holds a JSON {type(manifest).__name__}, not an object"
    return manifest, ""


def manifest_damage(path: str | Path) -> str:
    """What is wrong with the run's manifest; "" when it reads."""
    return read_manifest_or_damage(path)[1]


@dataclass(frozen=True)
class ConfigRead:
    """config.yaml as a mapping; empty, with ``problem`` naming why, when it cannot be."""

    data: dict[str, Any]
    problem: str = ""


def read_config(path: str | Path) -> ConfigRead:
    """The run's saved config.yaml (as written: not validated against today's Config)."""
    file = require_run_dir(path) / CONFIG
    if not file.is_file():
        return ConfigRead({}, f"no {CONFIG} (deleted, or never written)")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        return ConfigRead({}, f"{CONFIG} is not valid YAML: {_yaml_error(exc)}")
    except (OSError, UnicodeDecodeError) as exc:
        return ConfigRead({}, f"{CONFIG} cannot be read: {exc}")
    if data is None:  # empty: every setting at its default
        return ConfigRead({})
    if not isinstance(data, dict):
        return ConfigRead(
            {}, f"{CONFIG} is not a mapping of sections (it holds a {type(data).__name__})"
        )
    return ConfigRead(data)


def _yaml_error(exc: yaml.YAMLError) -> str:
    """The parser's complaint in one line: 'line L, column C: problem'."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def segment_files(path: str | Path, folder: str = METRICS) -> list[Path]:
    """Complete segments of one table, in (attempt, first step) order."""
    directory = Path(path) / folder
    return sorted(directory.glob("part-*.parquet")) if directory.is_dir() else []


def read_table(path: str | Path, folder: str) -> pa.Table | None:
    """Every segment of one table (metrics, layers, spectra), sorted by (attempt, step);
    None when the run has none."""
    path = require_run_dir(path)
    tables = []
    for file in segment_files(path, folder):
        try:
            tables.append(pq.read_table(file))
        except (OSError, pa.ArrowInvalid) as exc:  # a damaged disk; the rest is still useful
            print(f"warning: skipping unreadable segment {file}: {exc}", file=sys.stderr)
    if not tables:
        return None
    table = pa.concat_tables(tables, promote_options="default")
    return table.sort_by([("attempt", "ascending"), ("step", "ascending")])


def read_metrics(path: str | Path) -> pa.Table:
    """All metric rows of a run, every attempt, sorted by (attempt, step)."""
    table = read_table(path, METRICS)
    if table is None:
        return pa.table(
            {
                "attempt": pa.array([], pa.int32()),
                "step": pa.array([], pa.int64()),
                "time": pa.array([], pa.float64()),
            }
        )
    return table


def read_evals(path: str | Path) -> list[dict[str, Any]]:
    """A run's few-shot evaluation rows (``yoto eval``, in-loop evaluation), every attempt,
    sorted by (attempt, step); empty when it has none."""
    table = read_table(path, EVALS)
    return [] if table is None else table.to_pylist()


def read_layers(path: str | Path) -> pa.Table:
    """Per-layer values, long: attempt, step, layer, metric, value."""
    table = read_table(path, LAYERS)
    if table is None:
        return pa.table(
            {
                "attempt": pa.array([], pa.int32()),
                "step": pa.array([], pa.int64()),
                "layer": pa.array([], pa.string()),
                "metric": pa.array([], pa.string()),
                "value": pa.array([], pa.float64()),
            }
        )
    return table


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Events in order, skipping what is not one (:func:`read_events_report` says which)."""
    return read_events_report(path).events


_LINES_NAMED = 5  # line numbers a message lists before it says "and N more"


@dataclass(frozen=True)
class EventsRead:
    """The events of a run's events.jsonl and what was skipped on the way.

    ``skipped``: numbers (from 1) of lines that are not an event: not JSON, or JSON but not
    an object. ``cut``: the number of the last line when a crash cut it mid-write (the file
    does not end in a newline and that line does not parse); that is what a kill during a
    write leaves, so it is named apart from the damage in the middle of the file."""

    events: list[dict[str, Any]]
    skipped: tuple[int, ...] = ()
    cut: int | None = None

    @property
    def problem(self) -> str:
        """One sentence for each kind of skip, e.g. '1 unreadable event line skipped (line
        7 of events.jsonl)'; "" when every line was an event."""
        parts = []
        if self.skipped:
            n = len(self.skipped)
            parts.append(
                f"{n} unreadable event line{'s' if n > 1 else ''} skipped "
                f"({_line_list(self.skipped)} of {EVENTS})"
            )
        if self.cut is not None:
            parts.append(f"a last line cut mid-write ignored (line {self.cut} of {EVENTS})")
        return "; ".join(parts)


def _line_list(lines: tuple[int, ...]) -> str:
    named = ", ".join(map(str, lines[:_LINES_NAMED]))
    more = len(lines) - _LINES_NAMED
    word = "line" if len(lines) == 1 else "lines"
    return f"{word} {named}" + (f" and {more} more" if more > 0 else "")


def read_events_report(path: str | Path) -> EventsRead:
    """Events in order, with the numbers of the lines that are not events (blank lines are
    not counted: they hold nothing)."""
    file = require_run_dir(path) / EVENTS
    if not file.exists():
        return EventsRead([])
    text = file.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    events, skipped = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        event = _event_or_none(line)
        if event is not None:
            events.append(event)
        else:
            skipped.append(number)
    cut = None
    if skipped and skipped[-1] == len(lines) and not text.endswith("\n"):
        cut = skipped.pop()
    return EventsRead(events, tuple(skipped), cut)


def _event_or_none(line: str) -> dict[str, Any] | None:
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None  # a stray list or number is no event


CRASHED_MAYBE = "crashed?"  # 'running', but its process on this host is gone
STALE = "stale"  # 'running', but its manifest stopped updating


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def liveness(manifest: Mapping[str, Any], now: float | None = None) -> str:
    """The status to show for a run: the manifest's, except that a ``running`` run whose
    writer is gone shows as ``crashed?`` (its host is this one and its pid is not alive)
    or ``stale`` (no heartbeat for ``STALE_AFTER_BEATS`` beats: killed on another host,
    or hung)."""
    status = str(manifest.get("status", "unknown"))
    if status != "running":
        return status
    pid, host = manifest.get("pid"), manifest.get("host")
    if isinstance(pid, int) and host == socket.gethostname() and not _process_alive(pid):
        return CRASHED_MAYBE
    beat = float(manifest.get("heartbeat_seconds") or HEARTBEAT_SECONDS)
    updated = manifest.get("updated")
    now = time.time() if now is None else now
    if isinstance(updated, int | float) and now - updated > STALE_AFTER_BEATS * beat:
        return STALE
    return status


@dataclass
class RunSummary:
    path: Path
    id: str
    name: str
    status: str  # as the manifest says
    state: str  # what to show: the status, or crashed?/stale for a dead 'running' run
    start: float | None
    end: float | None
    last_step: int | None
    tokens: float | None
    train_loss: float | None
    val_loss: dict[str, float] = field(default_factory=dict)
    best_val_loss: dict[str, float] = field(default_factory=dict)
    attempt: int = 0
    events: dict[str, int] = field(default_factory=dict)
    non_embedding_parameters: int | None = None  # N of scaling laws (Kaplan's count)
    sweep: dict[str, Any] | None = None  # {id, index, point, ...} for a run of 'yoto sweep'
    problems: list[str] = field(default_factory=list)  # what could not be read, one each

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["path"] = str(self.path)
        return out


def summarize(path: str | Path) -> RunSummary:
    """One run in a line, from its manifest; a run whose manifest is deleted or damaged is
    described from its other parts (:func:`manifest_from_disk`) with state ``damaged``.
    ``problems`` names what could not be read: the manifest, event lines, config.yaml."""
    path = require_run_dir(path)
    manifest, damage = read_manifest_or_damage(path)
    events = read_events_report(path)
    problems = [p for p in (damage, events.problem, read_config(path).problem) if p]
    if manifest is None:
        manifest = manifest_from_disk(path, events.events)
    summary = manifest.get("summary") or {}
    last_step = summary.get("last_step")
    return RunSummary(
        path=path,
        id=manifest.get("id", path.name),
        name=manifest.get("name", ""),
        status=manifest.get("status", "unknown"),
        state=DAMAGED if damage else liveness(manifest),
        start=manifest.get("start"),
        end=manifest.get("end"),
        last_step=int(last_step) if last_step is not None else None,
        tokens=summary.get(catalog.TOKENS.name),
        train_loss=summary.get(catalog.TRAIN_LOSS.name),
        val_loss=dict(summary.get("val_loss", {})),
        best_val_loss=dict(summary.get("best_val_loss", {})),
        attempt=int(summary.get("attempt", 0)),
        events=_kind_counts(events.events),
        non_embedding_parameters=manifest.get("non_embedding_parameters"),
        sweep=manifest.get("sweep"),
        problems=problems,
    )


def _kind_counts(events: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in events:
        kind = str(event.get("kind", "?"))
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def manifest_from_disk(path: Path, events: list[dict[str, Any]]) -> dict[str, Any]:
    """What a lost manifest said that the rest of the run still tells: id = the folder's
    name, start = the earliest time of its events and metric rows, summary = its metric
    rows summarised as the writer does; status ``unknown`` (only the manifest keeps it)."""
    metrics = read_metrics(path)
    times = [t for e in events if isinstance(t := e.get("time"), int | float)]
    if metrics.num_rows:
        times.append(pc.min(metrics["time"]).as_py())
    return {
        "id": path.name,
        "name": "",
        "status": "unknown",
        "start": min(times, default=None),
        "end": None,
        "summary": summary_of_rows(metrics),
    }


def summary_of_rows(metrics: pa.Table) -> dict[str, Any]:
    """The manifest's ``summary`` (``RunStore._summarise``) from the metric rows, sorted by
    (attempt, step): the newest row's attempt and step, the last train loss, tokens and
    steps recorded, and each source's last and best finite validation loss."""
    if not metrics.num_rows:
        return {}
    out: dict[str, Any] = {
        "attempt": metrics["attempt"][-1].as_py(),
        "last_step": metrics["step"][-1].as_py(),
    }
    for metric in (catalog.TRAIN_LOSS, catalog.TOKENS, catalog.STEPS):
        if metric.name in metrics.column_names:
            values = metrics[metric.name].drop_null()
            if len(values):
                out[metric.name] = values[-1].as_py()
    out["val_loss"], out["best_val_loss"] = {}, {}
    for key in metrics.column_names:
        name, labels = _split_key(key)
        values = metrics[key]
        if name != catalog.VAL_LOSS.name or not pa.types.is_floating(values.type):
            continue
        finite = values.filter(pc.is_finite(values))
        if len(finite):
            source = labels.get("source", "")
            out["val_loss"][source] = finite[-1].as_py()
            out["best_val_loss"][source] = pc.min(finite).as_py()
    return out


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """The run directories the given paths name. A run directory (:func:`is_run_dir`, a
    damaged one too) is itself; any other folder is a root of runs, standing for its
    children that are run directories, sorted by name.
    The same run reached twice (named and under a root, or through a link) counts once, at
    its first place. A path that is no folder raises require_run_dir's error."""
    found: dict[Path, Path] = {}  # resolved -> as reached
    for given in paths:
        path = Path(given)
        if is_run_dir(path):
            runs = [path]
        elif path.is_dir():
            runs = [child for child in sorted(path.iterdir()) if is_run_dir(child)]
        else:
            raise _not_a_folder(path)
        for run in runs:
            found.setdefault(run.resolve(), run)
    return list(found.values())


def list_runs(root: str | Path) -> list[RunSummary]:
    """Runs directly under ``root`` (or ``root`` itself if it is a run), newest first. A run
    without a readable manifest is listed too, state ``damaged``, its problems named."""
    root = Path(root)
    if not root.is_dir():
        raise RunDirError(f"runs root {str(root)!r} does not exist or is not a folder")
    runs = []
    for path in find_runs([root]):
        try:
            runs.append(summarize(path))
        except RunDirError as exc:
            if path == root:
                raise  # the run asked for, not one found under a root
            print(f"warning: {exc}", file=sys.stderr)
    runs.sort(key=lambda r: r.start or 0, reverse=True)
    return runs


@dataclass(frozen=True)
class Gap:
    """Steps ``first..last`` with no metric row: inside ``attempt``'s rows, or (attempt
    None) in no attempt at all, on the way from step 1 to the newest recorded step."""

    attempt: int | None
    first: int
    last: int

    def __str__(self) -> str:
        steps = (
            f"step {self.first}" if self.first == self.last else (f"steps {self.first}-{self.last}")
        )
        where = "in no attempt" if self.attempt is None else f"in attempt {self.attempt}"
        return f"{steps} missing {where}"


def _holes(steps: Iterable[int], first: int, last: int) -> list[tuple[int, int]]:
    have = sorted(set(steps))
    holes, expect = [], first
    for step in have:
        if step > expect:
            holes.append((expect, step - 1))
        expect = max(expect, step + 1)
    if expect <= last:
        holes.append((expect, last))
    return holes


def find_gaps(path: str | Path) -> list[Gap]:
    """Steps without a metric row. Every step writes one, so each attempt's rows run without
    a hole from its first step to its last, and all attempts together cover step 1 to the
    newest one (a rollback's or resume's attempt starts right after its checkpoint)."""
    by_attempt: dict[int, list[int]] = {}
    for file in segment_files(require_run_dir(path)):
        try:
            t = pq.read_table(file, columns=["attempt", "step"])
        except (OSError, pa.ArrowInvalid):
            continue  # a damaged segment: its steps show as missing
        for attempt, step in zip(t["attempt"].to_pylist(), t["step"].to_pylist(), strict=True):
            by_attempt.setdefault(int(attempt), []).append(int(step))
    gaps = [
        Gap(attempt, lo, hi)
        for attempt, steps in sorted(by_attempt.items())
        for lo, hi in _holes(steps, min(steps), max(steps))
    ]
    every = [s for steps in by_attempt.values() for s in steps]
    if every:
        inside = {(g.first, g.last) for g in gaps}
        gaps += [
            Gap(None, lo, hi) for lo, hi in _holes(every, 1, max(every)) if (lo, hi) not in inside
        ]
    return sorted(gaps, key=lambda g: (g.first, g.attempt is not None, g.attempt or 0))


def last_recorded(path: str | Path) -> tuple[int, int] | None:
    """(attempt, step) of the newest metric row on disk, from segment names alone."""
    newest = None
    for file in segment_files(path):
        span = segment_span(file.name)
        if span is not None:
            key = (span[0], span[2])
            newest = key if newest is None or key > newest else newest
    return newest
