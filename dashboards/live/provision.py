"""Provision a running Grafana with yoto's dashboards through its HTTP API (grafana-client).

Credentials come from the environment only, never from the command line (where they would
land in shell history and ``ps``): ``GRAFANA_TOKEN`` (a service-account token, sent as a
bearer header) or ``GRAFANA_USER`` + ``GRAFANA_PASSWORD`` (basic auth). No message this
module writes or raises contains them.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaException

from yoto.errors import ConfigError, YotoError

log = logging.getLogger("yoto")

TOKEN_ENV = "GRAFANA_TOKEN"
USER_ENV = "GRAFANA_USER"
PASSWORD_ENV = "GRAFANA_PASSWORD"

Credential = str | tuple[str, str]


def credential_from_env(env: Mapping[str, str] | None = None) -> Credential:
    env = os.environ if env is None else env
    token = env.get(TOKEN_ENV, "").strip()
    if token:
        return token
    user, password = env.get(USER_ENV, ""), env.get(PASSWORD_ENV, "")
    if user and password:
        return (user, password)
    raise ConfigError(
        f"no Grafana credentials: set {TOKEN_ENV} to a service-account token "
        f"(Administration > Service accounts, role Editor), or {USER_ENV} and {PASSWORD_ENV}"
    )


def public_url(url: str) -> str:
    """The URL without any user:password part, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def folder_uid(title: str) -> str:
    """A stable folder uid from its title (Grafana allows 40 of [A-Za-z0-9_-])."""
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "folder"
    return f"yoto-{slug}"[:40]


def push(
    url: str,
    dashboards: Mapping[str, dict[str, Any]],
    credential: Credential,
    folder: str | None = None,
    timeout: float = 10.0,
) -> list[str]:
    """Create or overwrite every dashboard (matched by uid); returns their uids."""
    secrets = [credential] if isinstance(credential, str) else list(credential)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--url must be http(s)://host[:port][/path], got {public_url(url)!r}")
    if parts.username or parts.password:
        raise ConfigError(
            f"put Grafana credentials in {TOKEN_ENV} or {USER_ENV}/{PASSWORD_ENV}, not in --url"
        )
    api = GrafanaApi.from_url(url, credential=credential, timeout=timeout)
    try:
        target = _ensure_folder(api, folder) if folder else None
        uids = []
        for name, board in sorted(dashboards.items()):
            # id None + overwrite: Grafana matches on uid, so a re-push replaces in place.
            payload: dict[str, Any] = {
                "dashboard": {**board, "id": None},
                "overwrite": True,
                "message": "yoto dashboards push",
            }
            if target:
                payload["folderUid"] = target
            api.dashboard.update_dashboard(payload)
            uids.append(board.get("uid", name))
            log.info("pushed %s to %s", name, public_url(url))
        return uids
    # grafana-client's HTTP library raises OSError subclasses for connection failures
    except (GrafanaException, OSError) as exc:
        raise YotoError(
            f"Grafana at {public_url(url)} refused or failed: {_redact(str(exc), secrets)}"
        ) from None


def _ensure_folder(api: GrafanaApi, title: str) -> str:
    for existing in api.folder.get_all_folders() or []:
        if existing.get("title") == title:
            return existing["uid"]
    created = api.folder.create_folder(title, uid=folder_uid(title))
    return created["uid"]


def _redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text
