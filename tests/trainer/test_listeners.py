"""A single-process ``yoto train`` listens on loopback only: no rendezvous store on every
interface, the collective backend's socket and the /metrics exporter on 127.0.0.1.

The child's listening sockets are read from ``/proc`` while it trains (what ``ss -ltnp``
shows: the socket inodes the process holds, matched against ``/proc/net/tcp{,6}``)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import FAST, VENV_BIN, subprocess_env
from yoto.trainer import distributed

LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column


def _address(hex_addr: str) -> str:
    """'0100007F:1F90' -> '127.0.0.1'; the 32-hex-digit IPv6 form likewise."""
    raw = bytes.fromhex(hex_addr.split(":")[0])
    # /proc prints each 32-bit word in host (little-endian) order
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket ``pid`` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == LISTEN and inode in inodes:
                found.add((_address(local), int(local.split(":")[1], 16)))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_a_single_process_run_listens_on_loopback_only(tmp_path: Path) -> None:
    sets = [
        x for item in (*FAST, "train.steps=8", "live.linger_seconds=0") for x in ("--set", item)
    ]
    cmd = [str(VENV_BIN / "yoto"), "train", "--run-root", str(tmp_path), "--no-progress"]
    cmd += ["--metrics-addr", "127.0.0.1:0", *sets]
    proc = subprocess.Popen(
        cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seen: set[tuple[str, int]] = set()
    try:
        while proc.poll() is None:
            try:
                seen |= listening(proc.pid)
            except (FileNotFoundError, ProcessLookupError):
                break  # it ended between poll() and the read
            time.sleep(0.1)
        out = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    # the exporter and gloo's own socket at least; none on a routable address
    assert len(seen) >= 2, f"saw only {seen}: the run ended before it was read?"
    assert {a for a, _ in seen if not ipaddress.ip_address(a).is_loopback} == set(), seen


def test_threads_follow_omp_num_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert distributed.cpu_threads(world=1) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.cpu_threads(world=2) == max(1, distributed.usable_cpus() // 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    with pytest.raises(distributed.ConfigError, match="OMP_NUM_THREADS='lots'"):
        distributed.cpu_threads(world=1)


def test_threads_fit_the_cpus_this_process_may_use(tmp_path, monkeypatch) -> None:
    """A job pinned to some CPUs (taskset, a cpuset) or given a CPU quota (docker --cpus)
    gets threads for those, not for every core of the host."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert distributed.usable_cpus(cpu_max) == 8  # no quota: the affinity
    cpu_max.write_text("250000 100000\n")
    assert distributed.usable_cpus(cpu_max) == 3  # 2.5 CPUs of quota, rounded up
    assert distributed.usable_cpus(tmp_path / "absent") == 8
    monkeypatch.setattr(distributed, "CGROUP_CPU_MAX", cpu_max)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert distributed.cpu_threads(world=1) == 2  # pinned to 2 of the host's cores


def test_the_cli_sets_a_short_openmp_spin_before_torch_loads() -> None:
    """yoto's wait default reaches libgomp only if set before torch is imported; the user's
    own choice (a wait policy or a spin count) is left alone."""
    from yoto.cli import CPU_SHARING_DEFAULTS, share_cpus_gracefully

    probe = (
        "import os, sys; from yoto.cli import main; main(['presets']); "
        "print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[-2:] == [CPU_SHARING_DEFAULTS["GOMP_SPINCOUNT"], "False"]
    for theirs in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "0"}):
        environ = dict(theirs)
        share_cpus_gracefully(environ)
        assert environ == theirs
    environ = {}
    share_cpus_gracefully(environ)
    assert environ == CPU_SHARING_DEFAULTS


def test_a_child_does_not_inherit_the_loopback_choice(monkeypatch) -> None:
    """The interface setup() chose for its own world of one is not forced on a child job
    (which may span hosts); one the user set is passed on."""
    monkeypatch.setattr(distributed, "_SET_HERE", {"GLOO_SOCKET_IFNAME"})
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    env = distributed.child_env()
    assert "GLOO_SOCKET_IFNAME" not in env and env["NCCL_SOCKET_IFNAME"] == "ib0"
