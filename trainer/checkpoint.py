"""Checkpoints that are either complete or ignored.

DeepSpeed writes ``checkpoints/step-N/`` (its shards; ``save_latest=False``: its ``latest``
file is written without fsync or rename, so yoto never uses it). yoto adds, per rank, a
small file with that rank's RNG state, and, once every rank is done and only then, a
``COMPLETE`` marker listing every file with its size and sha256, written to a temporary
name, fsync'd and renamed. Hashing runs in a background thread on rank 0 so the loop does
not wait for it; a checkpoint without its marker is simply not a checkpoint yet.

On load, the newest checkpoint whose marker exists and whose files all match it is used;
any other is skipped with a reason the caller records as an event.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import os
import queue
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from yoto.errors import DiskFull
from yoto.runstore import (
    COMPLETE,
    CheckpointDir,
    atomic_write_json,
    fsync_dir,
    list_checkpoints,
    tag_for,
)

from . import distributed

_CHUNK = 8 << 20
_NEARLY_FULL = 1 << 20  # bytes free below which a failed write is taken for a full disk


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
        os.fsync(f.fileno())  # DeepSpeed does not fsync its shards; make them durable
    return digest.hexdigest()


def _payload_files(path: Path) -> list[Path]:
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and p.name != COMPLETE and not p.name.startswith(f".{COMPLETE}")
    )


def write_complete(path: Path, step: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash every file of the checkpoint and write its COMPLETE marker, atomically, last."""
    files = {
        str(p.relative_to(path)): {"size": p.stat().st_size, "sha256": _hash_file(p)}
        for p in _payload_files(path)
    }
    for folder in {p.parent for p in _payload_files(path)}:
        fsync_dir(folder)
    marker = {"step": step, "time": time.time(), "files": files, **(extra or {})}
    atomic_write_json(path / COMPLETE, marker)
    return marker


def verify(ckpt: CheckpointDir, check_hashes: bool = True) -> str | None:
    """None if the checkpoint is complete and intact, else why it is not."""
    marker_path = ckpt.path / COMPLETE
    if not marker_path.is_file():
        return "no COMPLETE marker (the save did not finish)"
    try:
        marker = json.loads(marker_path.read_text())
        files = marker["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"COMPLETE marker is unreadable ({exc})"
    if marker.get("step") != ckpt.step:
        return f"COMPLETE marker is for step {marker.get('step')}, folder is step {ckpt.step}"
    if not files:
        return "COMPLETE marker lists no files"
    for rel, meta in files.items():
        file = ckpt.path / rel
        if not file.is_file():
            return f"{rel} is missing"
        if file.stat().st_size != meta.get("size"):
            return f"{rel} has {file.stat().st_size} bytes, COMPLETE says {meta.get('size')}"
        if check_hashes and _hash_file(file) != meta.get("sha256"):
            return f"{rel} does not match its sha256 in COMPLETE (corrupt)"
    return None


def newest_valid(
    root: Path, on_reject: Callable[[CheckpointDir, str], None], check_hashes: bool = True
) -> CheckpointDir | None:
    for ckpt in reversed(list_checkpoints(root)):
        reason = verify(ckpt, check_hashes)
        if reason is None:
            return ckpt
        on_reject(ckpt, reason)
    return None


def prune(root: Path, keep_last: int, protect: Iterable[int] = ()) -> list[CheckpointDir]:
    """Keep the newest ``keep_last`` complete checkpoints (and any step in ``protect``);
    remove older complete ones and incomplete ones older than the newest complete."""
    protect = set(protect)
    all_ckpts = list_checkpoints(root)
    complete = [c for c in all_ckpts if c.complete]
    if not complete:
        return []
    keep = {c.step for c in complete[-keep_last:]} | protect
    newest = complete[-1].step
    removed = []
    for ckpt in all_ckpts:
        if ckpt.step in keep or ckpt.step > newest:
            continue
        shutil.rmtree(ckpt.path, ignore_errors=True)
        removed.append(ckpt)
    return removed


def _rank_file(rank: int) -> str:
    return f"yoto-rank{rank:05d}.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class SaveResult:
    step: int
    path: Path
    seconds: float
    bytes: int
    removed: list[int]
    error: str | None = None


class Checkpointer:
    """Saves through DeepSpeed on every rank; rank 0 finalises (hash, COMPLETE, prune) in
    the background. :meth:`poll` hands finished saves back to the loop's thread."""

    def __init__(self, root: Path, keep_last: int, rank: int) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self._thread: threading.Thread | None = None
        self._done: queue.Queue[SaveResult] = queue.Queue()
        self.protect: set[int] = set()

    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> None:
        self.wait()
        path = self.root / tag_for(step)
        if self.rank == 0 and path.exists():  # an unfinished save of the same step: start clean
            shutil.rmtree(path)
        distributed.barrier()
        started = time.perf_counter()
        full_at: int | None = None
        try:
            engine.save_checkpoint(
                str(self.root), tag=path.name, client_state=client_state, save_latest=False
            )
            torch.save(rng_state(), path / _rank_file(self.rank))
        except Exception as exc:
            full_at = self._free_if_disk_full(exc)
            if full_at is None:
                raise
            # the failed writer's frames hold its open file, whose blocks stay taken
            traceback.clear_frames(exc.__traceback__)
        if full_at is not None:  # raised outside the handler: one message, no chain
            self._disk_full(path, full_at)
        distributed.barrier()  # every rank's shards are on disk before rank 0 seals them
        if self.rank == 0:
            self._thread = threading.Thread(
                target=self._finalise, args=(path, step, started), name="yoto-ckpt", daemon=True
            )
            self._thread.start()

    def last_size(self) -> int | None:
        """Bytes of the newest sealed checkpoint (what the next one will take), if any."""
        for ckpt in reversed(list_checkpoints(self.root)):
            try:
                marker = json.loads((ckpt.path / COMPLETE).read_text())
                return sum(int(f["size"]) for f in marker["files"].values())
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return None

    def _free_if_disk_full(self, exc: Exception) -> int | None:
        """The free bytes when a failed save is a full disk, whatever the writer said
        (torch reports it as "unexpected pos" or an iostream error); None otherwise."""
        free = shutil.disk_usage(self.root).free
        nospace = any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in _causes(exc))
        if nospace or free < max(self.last_size() or 0, _NEARLY_FULL):
            return free
        return None

    def _disk_full(self, path: Path, free: int) -> None:
        """The unsealed folder is removed (no resume would use it, and the run's record
        needs the room), then the one message."""
        gc.collect()  # close what the failed writer left open
        shutil.rmtree(path, ignore_errors=True)
        after = shutil.disk_usage(self.root).free
        raise DiskFull(
            f"no space left on device while writing checkpoint {path.name} "
            f"({free / 2**20:.1f} MB free at {self.root}; {after / 2**20:.1f} MB once the "
            "unsealed checkpoint was removed). Free space, lower checkpoint.keep_last or "
            "move --run-root, then resume: yoto train --resume RUN_DIR"
        )

    def _finalise(self, path: Path, step: int, started: float) -> None:
        try:
            marker = write_complete(path, step)
            removed = prune(self.root, self.keep_last, self.protect)
            size = sum(f["size"] for f in marker["files"].values())
            self._done.put(
                SaveResult(
                    step, path, time.perf_counter() - started, size, [c.step for c in removed]
                )
            )
        except Exception as exc:  # reported as an event by the loop; the run goes on
            self._done.put(
                SaveResult(
                    step,
                    path,
                    time.perf_counter() - started,
                    0,
                    [],
                    error=f"{type(exc).__name__}: {exc}",
                )
            )

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def poll(self) -> list[SaveResult]:
        results = []
        while True:
            try:
                results.append(self._done.get_nowait())
            except queue.Empty:
                return results

    def load(self, engine: Any, ckpt: CheckpointDir) -> dict[str, Any]:
        """Load model, optimizer and client state on every rank; restore this rank's RNG."""
        load_path, client_state = engine.load_checkpoint(
            str(self.root if ckpt.path.parent == self.root else ckpt.path.parent),
            tag=ckpt.tag,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt.path}")
        rank_file = ckpt.path / _rank_file(self.rank)
        if rank_file.is_file():
            set_rng_state(torch.load(rank_file, weights_only=False))
        return client_state or {}
