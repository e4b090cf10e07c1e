#!/usr/bin/env python3
"""Write a Prometheus file_sd target file for a multi-node yoto job.

Only global rank 0 serves /metrics (it holds the reduced values of the whole job; other
ranks would repeat them or show partial ones), so the target is the node that hosts rank 0:

- DeepSpeed launcher: the first host of the hostfile (ranks are handed out in hostfile
  order, 0 .. slots-1 on the first line; mind --include/--exclude, which filter that list).
- SLURM + torchrun with a static rendezvous (--node_rank $SLURM_NODEID, --master_addr the
  first node): the first node of $SLURM_JOB_NODELIST.

    targets.py --hostfile hostfile --out targets/myrun.json
    targets.py --nodelist "$SLURM_JOB_NODELIST" --label slurm_job_id=$SLURM_JOB_ID \\
               --out "$TARGETS_DIR/$SLURM_JOB_ID.json"

Prometheus (deploy/multinode/prometheus.yml) watches targets/*.json and picks the file up
within its refresh interval; delete the file when the job ends. Standard library only, so
it runs on a login node without yoto installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

DEFAULT_PORT = 9477
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def read_hostfile(text: str) -> list[str]:
    """Hosts of a DeepSpeed hostfile (``host slots=N`` lines, # comments), in order."""
    hosts = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        host, *rest = line.split()
        if rest and not all(re.fullmatch(r"slots=\d+", r) for r in rest):
            raise ValueError(f"hostfile line {raw!r}: expected 'host slots=N'")
        if host in hosts:
            raise ValueError(f"hostfile names {host!r} twice")
        hosts.append(host)
    if not hosts:
        raise ValueError("hostfile lists no hosts")
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list, as ``scontrol show hostnames`` prints it:
    ``gpu[001-003,007],login1`` -> gpu001 gpu002 gpu003 gpu007 login1 (zero padding kept;
    several bracket groups in one name expand as a product)."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_item(item))
    if not hosts:
        raise ValueError(f"empty node list {nodelist!r}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in {text!r}")
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise ValueError(f"unbalanced '[' in {text!r}")
    items.append("".join(current))
    return [i for i in (s.strip() for s in items) if i]


def _expand_item(item: str) -> list[str]:
    match = re.search(r"\[([^\[\]]*)\]", item)
    if not match:
        return [item]
    head, tail = item[: match.start()], item[match.end() :]
    out = []
    for part in match.group(1).split(","):
        bounds = part.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            numbers = [bounds[0]]
        elif len(bounds) == 2 and all(b.isdigit() for b in bounds):
            lo, hi, width = int(bounds[0]), int(bounds[1]), len(bounds[0])
            if hi < lo:
                raise ValueError(f"descending range {part!r} in {item!r}")
            numbers = [str(n).zfill(width) for n in range(lo, hi + 1)]
        else:
            raise ValueError(f"cannot read range {part!r} in {item!r}")
        for number in numbers:
            out.extend(_expand_item(f"{head}{number}{tail}"))
    return out


def target_groups(
    hosts: list[str], port: int = DEFAULT_PORT, labels: dict[str, str] | None = None
) -> list[dict]:
    """One file_sd group: rank 0's host. ``nodes`` records the job's size for context."""
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    group_labels = {"role": "rank0", "nodes": str(len(hosts))}
    for key, value in (labels or {}).items():
        if not _LABEL.match(key) or key.startswith("__"):
            raise ValueError(f"{key!r} is not a valid Prometheus label name")
        group_labels[key] = value
    return [{"targets": [f"{hosts[0]}:{port}"], "labels": group_labels}]


def write_atomically(path: Path, groups: list[dict]) -> None:
    """Prometheus re-reads the file when it changes; never let it see half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(groups, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hostfile", type=Path, help="DeepSpeed hostfile")
    source.add_argument("--nodelist", help="SLURM node list, e.g. $SLURM_JOB_NODELIST")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="yoto's metrics port")
    parser.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="extra target label"
    )
    parser.add_argument("--out", type=Path, help="file to write (default: print)")
    args = parser.parse_args(argv)
    try:
        if args.hostfile:
            hosts = read_hostfile(args.hostfile.read_text(encoding="utf-8"))
        else:
            hosts = expand_nodelist(args.nodelist)
        labels = {}
        for item in args.label:
            key, sep, val = item.partition("=")
            if not sep:
                raise ValueError(f"--label {item!r}: expected KEY=VALUE")
            labels[key] = val
        groups = target_groups(hosts, args.port, labels)
    except (OSError, ValueError) as exc:
        print(f"targets.py: error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        write_atomically(args.out, groups)
        print(f"{args.out}: {groups[0]['targets'][0]} (rank 0 of {len(hosts)} nodes)")
    else:
        print(json.dumps(groups, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
