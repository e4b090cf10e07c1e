"""The live path on one machine without docker: Prometheus and Alertmanager started from
their binaries (Debian's packages; scripts/system-deps.sh installs them) on 127.0.0.1,
and a webhook receiver that records what it is sent. The integration tests and
benchmarks/live_path.py run the real servers through this module; each server lives as
long as its ``with`` block."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from yoto.catalog import SCRAPE_JOB
from yoto.errors import YotoError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MissingBinary(YotoError):
    """A server's binary is not installed."""


def find_binary(*names: str) -> str:
    """The first of ``names`` on PATH."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise MissingBinary(f"{' / '.join(names)} not installed (scripts/system-deps.sh installs it)")


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@contextlib.contextmanager
def running(cmd: list[str], ready_url: str, log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            try:
                wait_http(ready_url, proc=proc)
            except Exception as exc:
                raise RuntimeError(f"{cmd[0]} did not start: {log.read_text()[-2000:]}") from exc
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Prometheus:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def query(self, expr: str, at: float | None = None) -> dict[str, Any]:
        """The API's answer to an instant query (raises on an invalid expression)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self._get("query", params, timeout=10)

    def query_range(self, expr: str, start: float, end: float, step: str = "1s") -> list:
        """The series a range query returns (raises on an invalid expression)."""
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": step}
        return self._get("query_range", params, timeout=30)["result"]

    def _get(self, endpoint: str, params: dict[str, str], timeout: float) -> dict[str, Any]:
        url = f"{self.url}/api/v1/{endpoint}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{params['query']!r}: {exc.read().decode()}") from exc
        assert body["status"] == "success", body
        return body["data"]


@contextlib.contextmanager
def prometheus(
    tmp: Path,
    targets: list[str],
    rules: Path | None,
    alertmanager: str | None = None,
    interval: str = "1s",
) -> Iterator[Prometheus]:
    """A Prometheus scraping ``targets`` and evaluating ``rules`` every ``interval``."""
    binary = find_binary("prometheus")
    port = free_port()
    config: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {"job_name": SCRAPE_JOB, "static_configs": [{"targets": targets}]},
        ],
    }
    if rules is not None:
        config["rule_files"] = [str(rules)]
    if alertmanager is not None:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    (tmp / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    cmd = [
        binary,
        f"--config.file={tmp / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with running(cmd, f"http://127.0.0.1:{port}/-/ready", tmp / "prometheus.log"):
        yield Prometheus(port)


@contextlib.contextmanager
def alertmanager(tmp: Path, config_yaml: str) -> Iterator[str]:
    binary = find_binary("prometheus-alertmanager", "alertmanager")
    port, cluster = free_port(), free_port()
    (tmp / "alertmanager.yml").write_text(config_yaml)
    cmd = [
        binary,
        f"--config.file={tmp / 'alertmanager.yml'}",
        f"--storage.path={tmp / 'am-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--cluster.listen-address=127.0.0.1:{cluster}",
    ]
    with running(cmd, f"http://127.0.0.1:{port}/-/ready", tmp / "alertmanager.log"):
        yield f"127.0.0.1:{port}"


class Receiver:
    """A webhook endpoint that records every JSON body it accepts. ``down()`` closes the
    port (connection refused, as a dead chat relay); ``up()`` opens it again. ``reply``
    queues answers other than 200 (status, headers); ``arrivals`` has the time of every
    request on ``clock`` (a test may give its own)."""

    def __init__(self, port: int | None = None, clock: Callable[[], float] = time.time) -> None:
        self.port = port or free_port()
        self.clock = clock
        self.received: list[tuple[float, Any]] = []
        self.arrivals: list[float] = []
        self.requests = 0
        self.reply: list[tuple[int, dict[str, str]]] = []  # queued non-200 answers
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def up(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.requests += 1
                    receiver.arrivals.append(receiver.clock())
                    status, headers = receiver.reply.pop(0) if receiver.reply else (200, {})
                    if status == 200:
                        receiver.received.append((time.time(), json.loads(body or b"null")))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wait_for(self, count: int, timeout: float) -> list[tuple[float, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.received) >= count:
                    return list(self.received)
            time.sleep(0.05)
        with self._lock:
            return list(self.received)
