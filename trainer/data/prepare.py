"""``yoto data prepare``: tokenize raw sources once into a prepared directory (shards.py).

The main process reads documents in corpus order and hands batches of about 4 MB of text
to worker processes, at most two batches per worker in flight (memory stays bounded however
large the corpus); results come back in order and are split and written by the same rule
as raw text at start-up (corpus.SplitBuilder), so a prepared directory gives the streams
its files would. Each worker runs a single-threaded tokenizer: N workers use N cores.

Interrupted, it leaves ``prepare.json`` (its fingerprint) and no manifest: the directory is
refused as data, and running the same prepare again keeps the sources that were complete
(their ``done.json``) and writes the rest from scratch. Another config on a prepared or
half-prepared directory is refused unless ``--force``.
"""

from __future__ import annotations

import collections
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from yoto.config import Config
from yoto.errors import DataError

from . import shards
from . import tokenizer as tokenizers
from .corpus import TEXT, Document, SplitBuilder, chunks, kind_of, raw_documents
from .documents import input_bytes

_IN_FLIGHT_PER_WORKER = 2

_worker_tok: tokenizers.Tokenizer | None = None


def _init_worker(spec: str, eos: str | None) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker
    global _worker_tok
    _worker_tok = tokenizers.load(spec, eos)


def _encode(texts: list[bytes]) -> list[np.ndarray]:
    assert _worker_tok is not None
    return _worker_tok.encode_batch(texts)


@dataclass(frozen=True)
class Prepared:
    out: Path
    manifest: dict[str, Any]
    bytes: int  # text read
    seconds: float
    workers: int
    up_to_date: bool = False  # nothing to do: the directory was already this prepare's

    @property
    def mb_per_second(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)


def fingerprint(cfg: Config, tok: tokenizers.Tokenizer) -> dict[str, Any]:
    """Everything the prepared tokens depend on."""
    d = cfg.data
    return {
        "format": shards.FORMAT,
        "version": shards.VERSION,
        "tokenizer": tok.digest,
        "paths": [str(p) for p in d.paths],
        "cwd": os.getcwd() if d.paths else None,  # relative paths mean what they meant here
        "text_field": d.text_field,
        "source_field": d.source_field,
        "val_fraction": d.val_fraction,
        "max_bytes_per_source": d.max_bytes_per_source,
        "extensions": list(d.extensions),
        "min_tokens": cfg.model.seq_len + 1,
    }


def prepare(
    cfg: Config,
    out: str | Path,
    *,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> Prepared:
    """Tokenize data.paths (raw text; the standard library when empty) into ``out``."""
    for spec in cfg.data.paths:
        if kind_of(spec) != TEXT:
            raise DataError(
                f"data path {spec!r} is already tokenized ({kind_of(spec)}): `yoto data "
                "prepare` reads raw text (files, folders, JSONL, Parquet); train on it as is"
            )
    tok = tokenizers.load(cfg.data.tokenizer, cfg.data.eos)
    if workers is None:  # bytes encode at numpy speed: shipping them to workers costs more
        workers = 0 if tok.digest == tokenizers.BYTES else os.cpu_count() or 1
    root = Path(out).expanduser()
    fp = fingerprint(cfg, tok)
    done = _claim(root, fp, force)
    if done is None:
        manifest = shards.read_manifest(root)
        return Prepared(root, manifest, 0, 0.0, workers, up_to_date=True)
    start = clock()
    kept = tok.file_bytes()
    if kept is not None:
        (root / shards.TOKENIZER).write_bytes(kept)
    total = input_bytes(cfg.data)
    bar = tqdm(
        total=total,
        desc="prepare",
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        disable=not progress,
        file=sys.stderr,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
    )
    writers: dict[str, tuple[SplitBuilder, shards.SourceWriter]] = {}
    read = 0
    try:
        docs = (d for d in raw_documents(cfg.data, cfg.data.paths) if d.source not in done)
        for batch, encoded in _encoded(chunks(docs), tok, cfg, workers):
            size = sum(len(d.data) for d in batch)
            read += size
            bar.update(size)
            for doc, ids in zip(batch, encoded, strict=True):
                if doc.source not in writers:
                    writers[doc.source] = _writer(root, doc.source, cfg, tok)
                writers[doc.source][0].add(doc.id, ids)
        records = dict(done)
        for name in sorted(writers):
            builder, writer = writers.pop(name)
            try:
                counts = builder.finish()
            except DataError:
                writer.abort()
                raise
            records[name] = writer.commit(counts, {})
    except BaseException:
        for _, writer in writers.values():
            writer.abort()
        raise
    finally:
        bar.close()
    if not records:
        where = ", ".join(cfg.data.paths) if cfg.data.paths else "the standard library"
        raise DataError(f"no text found in {where} (data.paths)")
    seconds = clock() - start
    manifest = {
        "format": shards.FORMAT,
        "version": shards.VERSION,
        "fingerprint": fp,
        "tokenizer": tokenizers.describe(tok),
        "dtype": tok.dtype.name,
        "sources": records,
        "bytes": read,
        "seconds": round(seconds, 3),
        "workers": workers,
    }
    shards.write_json(root / shards.MANIFEST, manifest)
    (root / shards.PROGRESS).unlink(missing_ok=True)
    return Prepared(root, manifest, read, seconds, workers)


def _claim(root: Path, fp: dict[str, Any], force: bool) -> dict[str, dict[str, Any]] | None:
    """Make ``root`` this prepare's: None when it is already complete with the same
    fingerprint; else the sources an interrupted run of the same prepare finished."""
    manifest, progress = root / shards.MANIFEST, root / shards.PROGRESS
    if manifest.is_file() or progress.is_file():
        marker = manifest if manifest.is_file() else progress
        try:
            then = json.loads(marker.read_text()).get("fingerprint")
        except (OSError, ValueError):
            then = None
        if then == fp and manifest.is_file():
            return None
        if then != fp:
            if not force:
                changed = sorted(k for k in fp if (then or {}).get(k) != fp[k])
                raise DataError(
                    f"{str(root)!r} holds data prepared with other settings (they differ "
                    f"in {', '.join(changed) or 'format'}); give another --out, or --force "
                    "to replace it"
                )
            _wipe(root)
    elif root.exists() and any(root.iterdir()):
        if not force:
            raise DataError(
                f"--out {str(root)!r} is not empty and not a prepared directory; give a new "
                "or empty folder (or --force to replace what is there)"
            )
        _wipe(root)
    root.mkdir(parents=True, exist_ok=True)
    shards.write_json(progress, {"fingerprint": fp, "pid": os.getpid()})
    done: dict[str, dict[str, Any]] = {}
    for record in sorted((root / shards.SOURCES).glob(f"*/{shards.DONE}")):
        done[record.parent.name] = json.loads(record.read_text())
    return done


def _wipe(root: Path) -> None:
    for child in root.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def _writer(
    root: Path, name: str, cfg: Config, tok: tokenizers.Tokenizer
) -> tuple[SplitBuilder, shards.SourceWriter]:
    writer = shards.SourceWriter(root, name, tok.dtype)
    builder = SplitBuilder(
        name,
        val_fraction=cfg.data.val_fraction,
        min_tokens=cfg.model.seq_len + 1,
        eos_id=tok.eos_id,
        dtype=tok.dtype,
        train=writer.train,
        val=writer.val,
        docs=writer.docs,
    )
    return builder, writer


def _encoded(
    batches: Iterator[list[Document]], tok: tokenizers.Tokenizer, cfg: Config, workers: int
) -> Iterator[tuple[list[Document], list[np.ndarray]]]:
    """Each batch with its token ids, in order; ``workers`` processes (0: this one)."""
    if workers == 0:
        for batch in batches:
            yield batch, tok.encode_batch([d.data for d in batch])
        return
    ctx = mp.get_context("spawn")  # a forked tokenizer would lose its threads' state
    with ctx.Pool(workers, _init_worker, (cfg.data.tokenizer, cfg.data.eos)) as pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append((batch, pool.apply_async(_encode, ([d.data for d in batch],))))
            while len(pending) >= workers * _IN_FLIGHT_PER_WORKER:
                done_batch, result = pending.popleft()
                yield done_batch, result.get()
        while pending:
            done_batch, result = pending.popleft()
            yield done_batch, result.get()
