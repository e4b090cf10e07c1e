"""The real servers of dashboards/live/localstack.py, for tests: a missing binary skips
the test, except under CI, where a green run must mean the real server ran."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from yoto.dashboards.live import localstack
from yoto.dashboards.live.localstack import Prometheus, Receiver, free_port

__all__ = ["Prometheus", "Receiver", "alertmanager", "free_port", "prometheus", "require_binary"]


def require_binary(*names: str) -> str:
    """The first of ``names`` on PATH; missing: skip (CI: fail)."""
    try:
        return localstack.find_binary(*names)
    except localstack.MissingBinary as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{exc}; under CI this test must run")
        pytest.skip(str(exc))


@contextlib.contextmanager
def prometheus(tmp: Path, *args, **kwargs) -> Iterator[Prometheus]:
    require_binary("prometheus")
    with localstack.prometheus(tmp, *args, **kwargs) as server:
        yield server


@contextlib.contextmanager
def alertmanager(tmp: Path, config_yaml: str) -> Iterator[str]:
    require_binary("prometheus-alertmanager", "alertmanager")
    with localstack.alertmanager(tmp, config_yaml) as address:
        yield address
