"""Data path scaling: ``yoto train`` start-up and peak memory on prepared corpora of growing
size next to today's raw-text path, and ``yoto data prepare`` throughput per worker next
to a bare ``tokenizers`` loop over the same text.

**Corpora** (part 1) are made from text already on the machine, no network: the Python
standard library's documents as yoto's default corpus reads them (its ``.py`` files are
source ``code``; the pydoc topic pages and the library's .txt/.rst files are ``prose``),
copied again and again, each copy's documents opened by a line naming the copy, until the
target size (``--sizes``, MB of document text; default 30, 300 and 3000; ``--quick``: 3, 12
and 48). Each source gets half: ``code`` as a folder of ``.py`` files (``copy-NNNN/...``),
``prose`` as JSONL shards of 64 MB (a ``text`` field); data.paths names them
``code=DIR`` and ``prose=DIR``. Files not taken for text by yoto's check (one Latin-1
test module) are left out. Everything lives under ``--work`` (default a new folder under
/tmp) and is deleted at the end unless ``--keep``.

**Start-up and memory** (part 2). For each size, ``yoto data prepare`` with the byte
tokenizer (``data.tokenizer=bytes``: a BPE over 3 GB would take far too long on 2 cores)
makes a prepared directory, with ``--workers 0`` (``--prepare-workers``): the byte
tokenizer's encoding is one numpy copy, so shipping batches to worker processes costs more
than it saves; the CLI's default (one worker per core) is run once on the smallest corpus
for comparison; then ``yoto train --preset tiny`` for one step
(``eval.every=0 checkpoint.every=0 probes.spectra.enabled=false``, no metrics port) runs
as a child process on the prepared directory, and beside it on the raw files (today's path:
read and tokenized into memory at start-up). Measured per child:

- *to run dir*: seconds from launching the child (``time.time()`` just before its spawn)
  to the run directory's creation (manifest ``start``): interpreter, imports (torch,
  DeepSpeed), config, **the data** (opening the memory maps, or reading and tokenizing the
  raw text), the sampler, validation batches and the model's initialisation;
- *to first step*: launch to the run's ``start`` event, written just before the training
  loop: the above plus the DeepSpeed engine, probes and checkpointer: everything before
  the first step (the start-up figure the targets are about);
- *first step done*: launch to the first metrics row (its ``time``, the end of step 1);
- *wall*: launch to exit (also the end-of-run validation, checkpoint and record);
- *peak RSS*: the child's own ``ru_maxrss`` from ``os.wait4`` (the largest resident set
  of that child or any process it waited for; not the sum, not other children of this
  script), the child started by a small launcher process: a child's ``ru_maxrss`` also
  counts the process it was forked from, up to its ``exec``. Memory-mapped pages count
  while mapped, so a prepared corpus costs what the run touches of it. The launcher also
  samples the child's ``VmHWM`` every 50 ms, which gives its peak *by the run directory*
  and *by the first step* (what start-up itself needs, before training allocates);
- the *floor*: a child that only imports torch, DeepSpeed and ``yoto.trainer.run``.

Raw text costs about 4 bytes of memory per byte of text with the byte tokenizer (2-byte
ids, then a second copy while the parts are joined): sizes above ``--raw-max-mb``
(default 1000, so 3 GB is not) are not run raw, and the table says why, with the memory
the smaller sizes' slope predicts.

All corpora are made and prepared first (``os.sync()`` after each, so no writeback of
what was just written runs during a measurement); after one unmeasured child (it warms
the page cache of torch and DeepSpeed), every (size, path) child and the floor run once a
round, ``--repeats`` rounds, the order rotated and reversed each round. The flatness
ratios compare sizes, so the shared machine's load must hit all sizes alike: an earlier
version that ran each size's children together (prepared and raw interleaved per size
only) measured the prepared 3 GB start-up at 1.3-1.5x the 30 MB one, in runs whose load
average moved between 1.5 and 3 from size to size, while the data's own part of a
prepared start-up (``load_corpus``, the sampler and the validation batches, timed in
process) is under 10 ms at both sizes.

**Throughput** (part 3), on the smallest corpus: a byte-level BPE of ``--vocab`` (8000)
tokens is trained with ``yoto tokenizer train`` (multi-threaded, timed for information),
then, interleaved round by round (``--rounds``, order swapped each round), in this process:

- *bare*: a ``tokenizers.Tokenizer.from_file`` of it, single-threaded
  (``TOKENIZERS_PARALLELISM=false``, as each prepare worker), calling ``encode_batch`` on
  the documents in the batches prepare makes (about 4 MB of text), with bytes decoded to
  ``str`` first and each encoding's ``ids`` fetched: the tokenizer alone. The documents
  are the ones yoto reads (``raw_documents(cfg.data, cfg.data.paths)``), read into memory
  beforehand; reading them is timed apart (the *read* row: what prepare's main process
  does besides writing);
- *prepare W*: ``prepare(cfg, out, workers=W)`` with that tokenizer, W = 0 (encoding in
  the main process), 1 and 2: its own seconds (reading, worker start, encoding, the split
  and writing the files), MB/s of text and MB/s per worker; the target is prepare's MB/s
  per worker >= 0.8 x bare. W workers plus the main process share this machine's cores.

Prints a markdown table per part and one JSON line; the load average at start and end.

    .venv/bin/python benchmarks/data_scaling.py [--sizes 30,300,3000] [--repeats 5]
        [--rounds 3] [--work DIR] [--keep] [--raw-max-mb 1000] [--prepare-workers 0]
    .venv/bin/python benchmarks/data_scaling.py --quick    # 3, 12 and 48 MB: about a minute

A DeepSpeed start that hangs on a stale lock (a killed earlier build) is freed by removing
``~/.cache/torch_extensions/py311_cpu/deepspeed_shm_comm/lock``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from yoto import runstore
from yoto.config import load_config
from yoto.trainer.data.corpus import chunks, raw_documents
from yoto.trainer.data.documents import check_text, stdlib_documents

SIZES_MB = (30, 300, 3000)
QUICK_SIZES_MB = (3, 12, 48)
MB = 1_000_000
SHARD_BYTES = 64 * MB  # prose JSONL shard size
TRAIN = [
    "train.steps=1",
    "eval.every=0",
    "checkpoint.every=0",
    "probes.spectra.enabled=false",
]
RAW_BYTES_PER_BYTE = 4  # raw text's memory at start-up, byte tokenizer (docstring)
YOTO = str(Path(sys.executable).with_name("yoto"))
CHILD_TIMEOUT_S = 3600
# what every `yoto train` loads before it reads data: the memory and time floor
IMPORTS_ONLY = [sys.executable, "-c", "import torch, deepspeed, yoto.trainer.run"]


def log(msg: str) -> None:
    load = loadavg().split()[0]
    print(f"[{time.strftime('%H:%M:%S')} load {load}] {msg}", file=sys.stderr, flush=True)


def settle() -> float:
    """Write dirty pages out (``os.sync``) before a measurement, so the kernel's writeback of
    gigabytes just written does not run during it; returns the seconds it took."""
    start = time.perf_counter()
    os.sync()
    return time.perf_counter() - start


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def mem_total_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


# --- part 1: corpora ------------------------------------------------------------------------


def base_documents() -> dict[str, list[tuple[str, bytes]]]:
    """The standard library's documents by source, as yoto's default corpus reads them,
    without the files yoto's text check refuses."""
    docs: dict[str, list[tuple[str, bytes]]] = {"code": [], "prose": []}
    for doc in stdlib_documents():
        if doc.data and check_text(doc.data).is_text:
            docs[doc.source].append((doc.id, doc.data))
    return docs


def make_corpus(root: Path, size_mb: float, base: dict[str, list[tuple[str, bytes]]]) -> dict:
    """``size_mb`` MB of document text under ``root``: half code files, half prose JSONL."""
    marker = root / "corpus.json"
    if marker.is_file():
        made = json.loads(marker.read_text())
        if made.get("size_mb") == size_mb:
            made["seconds"] = 0.0
            made["reused"] = True
            return made
    if root.exists():
        shutil.rmtree(root)
    start = time.perf_counter()
    budget = int(size_mb * MB / 2)
    code_dir, prose_dir = root / "code", root / "prose"
    counts: dict[str, dict[str, int]] = {}
    # code: copy-NNNN/<stdlib path>.py, each file opened by a line naming its copy
    written = files = copies = 0
    while written < budget:
        head = f"# yoto data_scaling copy {copies}\n".encode()
        for rel, data in base["code"]:
            if written >= budget:
                break
            path = code_dir / f"copy-{copies:04d}" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(head + data)
            written += len(head) + len(data)
            files += 1
        copies += 1
    counts["code"] = {"bytes": written, "documents": files, "files": files, "copies": copies}
    # prose: JSONL shards, one document a line
    prose_dir.mkdir(parents=True)
    written = lines = copies = shard = 0
    out = open(prose_dir / f"shard-{shard:04d}.jsonl", "w", encoding="utf-8")  # noqa: SIM115
    shard_bytes = 0
    try:
        while written < budget:
            head = f"[yoto data_scaling copy {copies}]\n"
            for _, data in base["prose"]:
                if written >= budget:
                    break
                text = head + data.decode("utf-8", errors="replace")
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                if shard_bytes >= SHARD_BYTES:
                    out.close()
                    shard += 1
                    out = open(prose_dir / f"shard-{shard:04d}.jsonl", "w", encoding="utf-8")  # noqa: SIM115
                    shard_bytes = 0
                out.write(line)
                shard_bytes += len(line)
                written += len(text.encode("utf-8"))
                lines += 1
            copies += 1
    finally:
        out.close()
    counts["prose"] = {"bytes": written, "documents": lines, "files": shard + 1, "copies": copies}
    made = {
        "size_mb": size_mb,
        "bytes": sum(c["bytes"] for c in counts.values()),
        "sources": counts,
        "paths": [f"code={code_dir}", f"prose={prose_dir}"],
        "seconds": time.perf_counter() - start,
        "reused": False,
    }
    marker.write_text(json.dumps(made))
    return made


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- child processes --------------------------------------------------------------------


# A child's ru_maxrss also counts the memory of the process it was forked (or vforked)
# from, up to its exec: children of this (large) process would all read at least its
# size. So each is started by this small launcher, which reports its child's own peak.
LAUNCHER = """
import json, os, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
launched, t0 = time.time(), time.perf_counter()
pid = os.posix_spawn(cmd[0], cmd, os.environ)
marks = []  # (time, VmHWM KiB) of the child's main process, every 50 ms
while True:
    done, status, ru = os.wait4(pid, os.WNOHANG)
    if done:
        break
    try:
        with open(f"/proc/{pid}/status") as f:
            hwm = next(int(x.split()[1]) for x in f if x.startswith("VmHWM:"))
        marks.append((time.time(), hwm))
    except (OSError, StopIteration):
        pass
    time.sleep(0.05)
wall = time.perf_counter() - t0
with open(out, "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "wall": wall, "launched": launched,
               "rss_mib": ru.ru_maxrss / 1024, "cpu_s": ru.ru_utime + ru.ru_stime,
               "hwm": marks}, f)
"""


def hwm_by(marks: list[list[float]], t: float) -> float | None:
    """The child's peak RSS (MiB) by time ``t``, from the launcher's samples (50 ms)."""
    seen = [kib for when, kib in marks if when <= t]
    return max(seen) / 1024 if seen else None


def run_child(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` through :data:`LAUNCHER`: its exit code, wall seconds, launch time
    (``time.time()`` just before the spawn) and its own peak RSS (``os.wait4``)."""
    result = log_path.with_suffix(".json")
    result.unlink(missing_ok=True)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(result), *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a timeout kills the launcher and its child together
        )
        try:
            proc.wait(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
    got = json.loads(result.read_text()) if result.is_file() else {"rc": proc.returncode}
    if got["rc"] != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{shlex.join(cmd)} exited {got['rc']}:\n{tail}")
    return got


def sets(pairs: list[str]) -> list[str]:
    return [a for kv in pairs for a in ("--set", kv)]


def paths_set(paths: list[str]) -> str:
    return "data.paths=" + json.dumps(paths)


def yoto_prepare(paths: list[str], out: Path, workers: int | None, logs: Path) -> dict:
    cmd = [YOTO, "data", "prepare", "--preset", "tiny", "--out", str(out), "--force"]
    cmd += ["--no-progress", *sets([paths_set(paths), "data.tokenizer=bytes"])]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    got = run_child(cmd, logs / f"prepare-{out.name}.log")
    got.pop("hwm")
    manifest = json.loads((out / "manifest.json").read_text())
    got.update(
        bytes=manifest["bytes"],
        seconds=manifest["seconds"],
        workers=manifest["workers"],
        disk=disk_bytes(out),
        cmd=shlex.join(cmd),
    )
    return got


def yoto_train(paths: list[str], run_root: Path, name: str, logs: Path) -> dict:
    """One ``yoto train`` child for one step; its start-up read from its run directory."""
    if run_root.exists():
        shutil.rmtree(run_root)
    cmd = [YOTO, "train", "--preset", "tiny", "--run-root", str(run_root), "--name", name]
    cmd += ["--no-progress", "--metrics-addr", "0"]
    cmd += sets([*TRAIN, paths_set(paths), "data.tokenizer=bytes"])
    got = run_child(cmd, logs / f"train-{name}.log")
    (run_dir,) = [p for p in run_root.iterdir() if runstore.is_run_dir(p)]
    manifest = runstore.read_manifest(run_dir)
    start_event = next(e for e in runstore.read_events(run_dir) if e["kind"] == "start")
    metrics = runstore.read_metrics(run_dir)
    first_row = min(metrics.column("time").to_pylist())
    t0 = got["launched"]
    marks = got.pop("hwm")
    got.update(
        rss_at_run_dir=hwm_by(marks, manifest["start"]),
        rss_at_first_step=hwm_by(marks, start_event["time"]),
        to_run_dir=manifest["start"] - t0,
        to_first_step=start_event["time"] - t0,
        first_step_done=first_row - t0,
        train_tokens=sum(s["train_tokens"] for s in manifest["data"].values()),
        cmd=shlex.join(cmd),
    )
    shutil.rmtree(run_root)
    return got


# --- part 3: throughput ---------------------------------------------------------------------


def train_tokenizer(paths: list[str], vocab: int, out: Path, logs: Path) -> dict:
    cmd = [YOTO, "tokenizer", "train", "--vocab", str(vocab), "--out", str(out), "--no-progress"]
    cmd += sets([paths_set(paths)])
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    got = run_child(cmd, logs / "tokenizer-train.log", env=env)  # multi-threaded
    got["cmd"] = shlex.join(cmd)
    return got


def bare_loop(tok_path: Path, docs: list) -> dict:
    """encode_batch over the documents in prepare's batches, one thread; bytes decoded."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    start, cpu = time.perf_counter(), time.process_time()
    size = tokens = 0
    for batch in chunks(docs):
        texts = [d.data.decode("utf-8", errors="replace") for d in batch]
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            tokens += len(enc.ids)
        size += sum(len(d.data) for d in batch)
    seconds = time.perf_counter() - start
    return {
        "bytes": size,
        "tokens": tokens,
        "seconds": seconds,
        "cpu_per_wall": (time.process_time() - cpu) / seconds,
    }


def prepare_in_process(cfg: Any, out: Path, workers: int) -> dict:
    from yoto.trainer.data.prepare import prepare

    got = prepare(cfg, out, workers=workers, force=True, progress=False)
    tokens = sum(r["train_tokens"] + r["val_tokens"] for r in got.manifest["sources"].values())
    return {"bytes": got.bytes, "seconds": got.seconds, "tokens": tokens, "workers": workers}


def throughput(corpus: dict, args: argparse.Namespace, work: Path, logs: Path) -> dict:
    tok_path = work / f"bpe-{args.vocab}.json"
    log(f"part 3: training a {args.vocab}-token BPE on {corpus['bytes'] / MB:.0f} MB")
    trained = train_tokenizer(corpus["paths"], args.vocab, tok_path, logs)
    cfg = load_config(
        preset="tiny",
        overrides=[paths_set(corpus["paths"]), f"data.tokenizer={tok_path}"],
    )
    start = time.perf_counter()
    docs = list(raw_documents(cfg.data, cfg.data.paths))
    read_s = time.perf_counter() - start
    read_bytes = sum(len(d.data) for d in docs)
    variants = ["bare", *(f"prepare-{w}" for w in args.workers)]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else list(reversed(variants))
        for name in order:
            log(f"part 3 round {r + 1}/{args.rounds}: {name}")
            if name == "bare":
                runs[name].append(bare_loop(tok_path, docs))
            else:
                w = int(name.split("-")[1])
                out = work / f"prepared-bpe-w{w}"
                runs[name].append(prepare_in_process(cfg, out, w))
                shutil.rmtree(out)
    rates = {n: [x["bytes"] / MB / x["seconds"] for x in v] for n, v in runs.items()}
    med = {n: statistics.median(v) for n, v in rates.items()}
    return {
        "tokenizer_train": trained,
        "read": {"bytes": read_bytes, "seconds": read_s, "documents": len(docs)},
        "runs": runs,
        "mb_per_s": rates,
        "median_mb_per_s": med,
        "bare_cpu_per_wall": statistics.median(x["cpu_per_wall"] for x in runs["bare"]),
        "cmd_tokenizer": trained["cmd"],
    }


# --- the report ---------------------------------------------------------------------------


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def report_corpora(corpora: list[dict]) -> None:
    print("\n## Part 1: corpora (stdlib documents, copied)\n")
    print(
        "| target MB | text MB | code MB (files) | prose MB (JSONL lines, shards) | made in s "
        "| then os.sync s |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for c in corpora:
        code, prose = c["sources"]["code"], c["sources"]["prose"]
        made = "reused" if c["reused"] else f"{c['seconds']:.1f}"
        print(
            f"| {c['size_mb']:g} | {c['bytes'] / MB:.1f} | {code['bytes'] / MB:.1f} "
            f"({code['files']:,}) | {prose['bytes'] / MB:.1f} ({prose['documents']:,}, "
            f"{prose['files']}) | {made} | {c['sync_s']:.1f} |"
        )


def report_scaling(
    rows: list[dict], skipped: dict[float, str], prep_default: dict, imports: dict
) -> dict:
    print("\n## Part 2: `yoto train` start-up and peak RSS, prepared vs raw text\n")
    print(
        "Per child, median over repeats. Seconds from launch to: the run directory (imports, "
        "data, model), the `start` event (everything before step 1: the start-up figure), "
        "the first metrics row (step 1 done), exit. Peak RSS: the child's own ru_maxrss; "
        "by run dir / first step: its main process's VmHWM sampled every 50 ms.\n"
    )
    print(
        "| text MB | path | prepare s (MB/s, RSS MiB) | to run dir s | to first step s "
        "| step 1 done s | wall s | peak RSS MiB | RSS by run dir / first step | train tokens |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        prep = row.get("prepare")
        prep_s = (
            f"{prep['seconds']:.2f} ({prep['bytes'] / MB / prep['seconds']:.1f}, "
            f"{prep['rss_mib']:.0f})"
            if prep
            else "-"
        )
        m = row["median"]
        print(
            f"| {row['mb']:.1f} | {row['path']} | {prep_s} | {m['to_run_dir']:.2f} | "
            f"{m['to_first_step']:.2f} | {m['first_step_done']:.2f} | {m['wall']:.2f} | "
            f"{m['rss_mib']:.0f} | {fmt(m['rss_at_run_dir'], '.0f')} / "
            f"{fmt(m['rss_at_first_step'], '.0f')} | {row['train_tokens']:,} |"
        )
    for mb, why in skipped.items():
        print(f"| {mb:.1f} | raw | - | skipped: {why} | | | | | | |")
    print(
        f"\nThe floor, measured in the same rounds: a child that only imports what `yoto "
        f"train` loads before its data (`{shlex.join(IMPORTS_ONLY[1:])}`) takes "
        f"{imports['wall']:.2f} s and peaks at {imports['rss_mib']:.0f} MiB (medians)."
    )
    first = rows[0]["prepare"]
    print(
        f"\n`yoto data prepare` above: --workers {first['workers']}. With the CLI's default "
        f"(--workers {prep_default['workers']}, one per core) on the {rows[0]['mb']:.0f} MB "
        f"corpus: {prep_default['seconds']:.1f} s = "
        f"{prep_default['bytes'] / MB / prep_default['seconds']:.1f} MB/s "
        f"(vs {first['bytes'] / MB / first['seconds']:.1f}), peak RSS "
        f"{prep_default['rss_mib']:.0f} MiB (main process and workers: the largest one)."
    )
    flat = {}
    print(
        "\nFlatness, largest / smallest corpus measured (target for prepared: <= 1.10 for "
        "start-up and peak RSS); medians over repeats, and in brackets the ratio of the "
        "fastest repeats (the least disturbed by this shared machine's load):\n"
    )
    print("| path | sizes MB | to first step | to run dir | peak RSS | RSS by first step |")
    print("|---|---|---:|---:|---:|---:|")
    for path in ("prepared", "raw"):
        mine = [r for r in rows if r["path"] == path]
        if len(mine) < 2:
            continue
        lo, hi = mine[0], mine[-1]
        keys = ("to_first_step", "to_run_dir", "rss_mib", "rss_at_first_step")
        ratios = {k: hi["median"][k] / lo["median"][k] for k in keys}
        for k in ("to_first_step", "to_run_dir"):
            ratios[f"{k}_fastest"] = min(x[k] for x in hi["runs"]) / min(x[k] for x in lo["runs"])
        flat[path] = ratios
        print(
            f"| {path} | {lo['mb']:.0f} -> {hi['mb']:.0f} | "
            f"{ratios['to_first_step']:.3f} ({ratios['to_first_step_fastest']:.3f}) | "
            f"{ratios['to_run_dir']:.3f} ({ratios['to_run_dir_fastest']:.3f}) | "
            f"{ratios['rss_mib']:.3f} | {ratios['rss_at_first_step']:.3f} |"
        )
    return flat


def report_throughput(tp: dict, workers: list[int]) -> dict:
    med = tp["median_mb_per_s"]
    bare = med["bare"]
    read = tp["read"]
    trained = tp["tokenizer_train"]
    print("\n## Part 3: `yoto data prepare` throughput vs a bare `tokenizers` loop\n")
    print(
        f"BPE trained by `yoto tokenizer train` in {trained['wall']:.1f} s (all threads). "
        f"Text: {read['bytes'] / MB:.1f} MB in {read['documents']:,} documents; reading them "
        f"alone (raw_documents): {read['seconds']:.2f} s = "
        f"{read['bytes'] / MB / read['seconds']:.1f} MB/s. Bare loop CPU/wall: "
        f"{tp['bare_cpu_per_wall']:.2f} (1.0 = one thread). Median over rounds.\n"
    )
    print("| variant | MB/s | MB/s per worker | per worker / bare | runs MB/s |")
    print("|---|---:|---:|---:|---|")
    print(
        f"| bare encode_batch, 1 thread | {bare:.2f} | {bare:.2f} | 1.000 | "
        f"{', '.join(f'{x:.2f}' for x in tp['mb_per_s']['bare'])} |"
    )
    ratios = {}
    for w in workers:
        name = f"prepare-{w}"
        per = med[name] / max(w, 1)
        ratios[w] = per / bare
        label = f"prepare, workers={w}" + (" (main process encodes)" if w == 0 else "")
        print(
            f"| {label} | {med[name]:.2f} | {per:.2f} | {ratios[w]:.3f} | "
            f"{', '.join(f'{x:.2f}' for x in tp['mb_per_s'][name])} |"
        )
    print("\nTarget: per worker / bare >= 0.8.")
    return ratios


def main() -> int:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers runs: the bare loop
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", help="corpus sizes in MB of text, comma-separated")
    ap.add_argument("--quick", action="store_true", help="sizes 3,12,48, one repeat and round")
    ap.add_argument("--repeats", type=int, help="rounds of train children (default 5)")
    ap.add_argument("--rounds", type=int, help="throughput rounds (default 3)")
    ap.add_argument("--work", help="working folder (default: a new one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep corpora and prepared dirs")
    ap.add_argument("--raw-max-mb", type=float, default=1000.0, help="largest raw-text run")
    ap.add_argument(
        "--prepare-workers", type=int, default=0, help="`yoto data prepare --workers` (part 2)"
    )
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--workers", default="0,1,2", help="prepare workers compared in part 3")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    sizes = (
        [float(s) for s in args.sizes.split(",")]
        if args.sizes
        else list(QUICK_SIZES_MB if args.quick else SIZES_MB)
    )
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.workers = [int(w) for w in args.workers.split(",")]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="yoto-data-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    command = shlex.join([".venv/bin/python", "benchmarks/data_scaling.py", *sys.argv[1:]])
    load_start = loadavg()
    print(f"# data_scaling: {command}")
    print(
        f"load average at start: {load_start}; {os.cpu_count()} CPUs, "
        f"{mem_total_gb():.1f} GB memory; work dir {work}"
    )
    log(f"load {load_start}; work dir {work}")
    base = base_documents()
    corpora: list[dict] = []
    rows: list[dict] = []
    skipped: dict[float, str] = {}
    tp = None
    prep_default: dict = {}
    imports: dict = {}
    try:
        made: list[dict] = []  # per size: text MB, the paths of each kind, the prepare
        for i, size in enumerate(sizes):
            log(f"part 1: making the {size:g} MB corpus")
            corpus = make_corpus(work / f"corpus-{size:g}MB", size, base)
            corpora.append(corpus)
            mb = corpus["bytes"] / MB
            corpus["sync_s"] = settle()
            if i == 0 and not args.skip_throughput:
                tp = throughput(corpus, args, work, logs)
            log(f"part 2: yoto data prepare {mb:.0f} MB")
            prepared_dir = work / f"prepared-{size:g}MB"
            prep = yoto_prepare(corpus["paths"], prepared_dir, args.prepare_workers, logs)
            if i == 0:
                log("part 2: yoto data prepare with the CLI's default workers, for comparison")
                default_dir = work / "prepared-default-workers"
                prep_default = yoto_prepare(corpus["paths"], default_dir, None, logs)
                shutil.rmtree(default_dir)
            prep["sync_s"] = settle()
            paths = {"prepared": [str(prepared_dir)]}
            if mb <= args.raw_max_mb:
                paths["raw"] = corpus["paths"]
            made.append({"size": size, "mb": mb, "paths": paths, "prepare": prep})
        log("part 2: warm-up child (not measured)")
        yoto_train(made[0]["paths"]["prepared"], work / "runs-warmup", "warmup", logs)
        # every (size, path) child and the imports-only floor, round by round, the order
        # rotated (and reversed) each round: the ratios compare sizes, so the machine's
        # load must hit all sizes alike
        combos = [(m, kind) for m in made for kind in m["paths"]] + [(None, "imports")]
        got: dict[tuple[float, str], list[dict]] = {}
        floor: list[dict] = []
        for r in range(args.repeats):
            k = r % len(combos)
            order = combos[k:] + combos[:k]
            for m, kind in order if r % 2 == 0 else list(reversed(order)):
                if m is None:
                    log(f"part 2: imports-only child, round {r + 1}/{args.repeats}")
                    floor.append(run_child(IMPORTS_ONLY, logs / "imports.log"))
                    continue
                log(f"part 2: train {kind} {m['mb']:.0f} MB, round {r + 1}/{args.repeats}")
                run_root, name = work / f"runs-{kind}", f"{kind}-{m['size']:g}"
                child = yoto_train(m["paths"][kind], run_root, name, logs)
                got.setdefault((m["mb"], kind), []).append(child)
        imports = {k: median([x[k] for x in floor]) for k in ("wall", "rss_mib")}
        keys = ("to_run_dir", "to_first_step", "first_step_done", "wall", "rss_mib")
        keys += ("rss_at_run_dir", "rss_at_first_step")
        for m in made:
            for kind in m["paths"]:
                runs = got[(m["mb"], kind)]
                rows.append(
                    {
                        "mb": m["mb"],
                        "path": kind,
                        "prepare": m["prepare"] if kind == "prepared" else None,
                        "median": {k: median([x[k] for x in runs]) for k in keys},
                        "runs": runs,
                        "train_tokens": runs[0]["train_tokens"],
                        "cmd": runs[0]["cmd"],
                    }
                )
        raw_rows = [r for r in rows if r["path"] == "raw"]
        for m in made:
            if "raw" in m["paths"]:
                continue
            mb, slope = m["mb"], ""
            if len(raw_rows) >= 2:
                lo, hi = raw_rows[0], raw_rows[-1]
                d_rss = (hi["median"]["rss_mib"] - lo["median"]["rss_mib"]) * 2**20
                per = d_rss / ((hi["mb"] - lo["mb"]) * MB)
                est = hi["median"]["rss_mib"] * 2**20 + per * (mb - hi["mb"]) * MB
                slope = f"; measured slope {per:.1f} B/B predicts {est / 1e9:.1f} GB"
            skipped[mb] = (
                f"{mb:.0f} MB > --raw-max-mb {args.raw_max_mb:g}: raw text is tokenized "
                f"into memory (~{RAW_BYTES_PER_BYTE} B per byte: "
                f"~{RAW_BYTES_PER_BYTE * mb / 1e3:.0f} GB{slope}) on a "
                f"{mem_total_gb():.0f} GB machine shared with others"
            )
        if not args.keep:
            for size in sizes:
                shutil.rmtree(work / f"prepared-{size:g}MB", ignore_errors=True)
                shutil.rmtree(work / f"corpus-{size:g}MB", ignore_errors=True)
        rows.sort(key=lambda r: (r["path"] != "prepared", r["mb"]))
        report_corpora(corpora)
        flat = report_scaling(rows, skipped, prep_default, imports)
        ratios = report_throughput(tp, args.workers) if tp else {}
        print("\nOne child of each kind, as run (paths under the work dir):\n")
        for kind in ("prepared", "raw"):
            row = next((r for r in rows if r["path"] == kind), None)
            if row:
                print(f"    {row['cmd']}")
        print(f"    {rows[0]['prepare']['cmd']}")
        if tp:
            print(f"    {tp['cmd_tokenizer']}")
        load_end = loadavg()
        print(f"\nload average at end: {load_end} (start: {load_start})")
        print(f"reproduce: {command}")
        print(
            json.dumps(
                {
                    "command": command,
                    "load_start": load_start,
                    "load_end": load_end,
                    "corpora": [
                        {k: c[k] for k in ("size_mb", "bytes", "sources")} for c in corpora
                    ],
                    "scaling": [
                        {
                            "mb": r["mb"],
                            "path": r["path"],
                            "median": r["median"],
                            "runs": [
                                {k: v for k, v in x.items() if k not in ("cmd", "launched")}
                                for x in r["runs"]
                            ],
                            "prepare": (
                                {k: v for k, v in r["prepare"].items() if k != "cmd"}
                                if r["prepare"]
                                else None
                            ),
                        }
                        for r in rows
                    ],
                    "raw_skipped": skipped,
                    "imports_only": {k: imports.get(k) for k in ("wall", "rss_mib")},
                    "prepare_default_workers": {
                        k: prep_default.get(k) for k in ("workers", "bytes", "seconds", "rss_mib")
                    },
                    "flatness": flat,
                    "throughput": (
                        {
                            "median_mb_per_s": tp["median_mb_per_s"],
                            "mb_per_s": tp["mb_per_s"],
                            "read": tp["read"],
                            "per_worker_over_bare": ratios,
                            "bare_cpu_per_wall": tp["bare_cpu_per_wall"],
                            "tokenizer_train_s": tp["tokenizer_train"]["wall"],
                        }
                        if tp
                        else None
                    ),
                }
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
