"""Alertmanager routing as code: ``deploy/alertmanager/alertmanager.yml``.

Grouping and timing are chosen for training runs, not web services: a run's alerts are
grouped by run and alert name (a spike storm is one message, not fifty); critical alerts
(non-finite loss, halted, loss scale at minimum, metrics absent) go out after 10 s and
repeat hourly while they last, because a halted 100B run burns a cluster every minute
nobody looks; warnings wait 30 s for their group and repeat every 4 hours. Info alerts (the raw
per-series spike rules) go to a receiver with no notifications: what pages about an
instability is its episode (``YotoInstabilityEpisode``), one alert per run that keeps firing
while episodes come. A halted run inhibits its own episode, spike, rollback and throughput
alerts; a rollback inhibits the episode alert it ended (its own alert says more); a target
that is down inhibits the stalled-run alert.

Secrets never live in this file: Slack and Discord URLs (which are the secret) are read
from files; webhook endpoints are cluster addresses with a bearer token read from a file;
the files are mounted from the host (deploy/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from yoto.errors import ConfigError

CONFIG_FILE = Path("deploy/alertmanager/alertmanager.yml")
SECRETS = "/etc/alertmanager/secrets"
CHANNELS = ("slack", "discord", "teams", "webhook")
SILENT = "silent"  # the receiver of info alerts: no notifications


@dataclass(frozen=True, slots=True)
class Channel:
    kind: str  # one of CHANNELS
    url_file: str | None = None  # where the webhook URL is read from
    url: str | None = None  # plain URL: only for a receiver without secrets (tests, relays)
    token_file: str | None = None  # bearer token for a webhook endpoint

    def config(self) -> tuple[str, dict]:
        if self.kind == "slack":
            api = {"api_url_file": self.url_file} if self.url_file else {"api_url": self.url}
            return "slack_configs", {
                **api,
                "send_resolved": True,
                "title": _TITLE,
                "text": _TEXT,
            }
        if self.kind == "discord":
            # Discord takes Slack's payload at its webhook URL + "/slack"; that keeps the
            # URL in a file on Alertmanager 0.25, whose discord_configs read it inline only
            api = {"api_url_file": self.url_file} if self.url_file else {"api_url": self.url}
            return "slack_configs", {**api, "send_resolved": True, "title": _TITLE, "text": _TEXT}
        if self.kind in ("teams", "webhook"):
            # Teams: through a relay such as prometheus-msteams (msteams_configs needs
            # Alertmanager >= 0.26); generic: Alertmanager's JSON to any endpoint. 0.25 reads
            # a webhook's URL inline only, so the endpoint is an address on the cluster
            # network and the secret is a bearer token read from a file.
            conf: dict = {"url": self.url, "send_resolved": True, "max_alerts": 20}
            if self.token_file:
                conf["http_config"] = {"authorization": {"credentials_file": self.token_file}}
            return "webhook_configs", conf
        raise ConfigError(f"unknown chat channel {self.kind!r}; one of {', '.join(CHANNELS)}")


_TITLE = "[{{ .Status | toUpper }}] {{ .CommonLabels.alertname }} {{ .CommonLabels.name }}"
_TEXT = "{{ range .Alerts }}*{{ .Annotations.summary }}*\n{{ .Annotations.description }}\n{{ end }}"


def build_config(channels: list[Channel]) -> dict:
    if not channels:
        raise ConfigError("an Alertmanager config needs at least one chat channel")
    receiver: dict = {"name": "training-chat"}
    for channel in channels:
        key, conf = channel.config()
        receiver.setdefault(key, []).append(conf)
    timing = {"group_wait": "30s", "group_interval": "5m", "repeat_interval": "4h"}
    return {
        "route": {
            "receiver": "training-chat",
            "group_by": ["alertname", "instance", "run"],
            **timing,
            "routes": [
                # shown in Prometheus and Grafana, never sent: a raw spike is no page
                {"matchers": ['severity="info"'], "receiver": SILENT},
                {
                    "matchers": ['severity="critical"'],
                    "receiver": "training-chat",
                    "group_wait": "10s",
                    "group_interval": "1m",
                    "repeat_interval": "1h",
                },
            ],
        },
        "inhibit_rules": [
            {
                "source_matchers": ['alertname="YotoRunHalted"'],
                "target_matchers": [
                    'alertname=~"YotoInstabilityEpisode|YotoLossSpike|YotoGradNormSpike|'
                    'YotoRollback|YotoThroughputDrop|YotoRunStalled"'
                ],
                "equal": ["instance"],
            },
            {
                # the rollback says it all: its episode, where it went and what it skipped
                "source_matchers": ['alertname="YotoRollback"'],
                "target_matchers": ['alertname="YotoInstabilityEpisode"'],
                "equal": ["instance"],
            },
            {
                "source_matchers": ['alertname="YotoMetricsAbsent"'],
                "target_matchers": ['alertname="YotoRunStalled"'],
                "equal": ["instance"],
            },
        ],
        "receivers": [receiver, {"name": SILENT}],
    }


def deploy_channels() -> list[Channel]:
    """The shipped example: every kind of chat, URLs from mounted secret files."""
    return [
        Channel("slack", url_file=f"{SECRETS}/slack_webhook_url"),
        Channel("discord", url_file=f"{SECRETS}/discord_webhook_url_slack"),
        Channel("teams", url="http://prometheus-msteams:2000/training"),
        Channel(
            "webhook", url="http://alert-relay:8080/yoto", token_file=f"{SECRETS}/webhook_token"
        ),
    ]


def render(channels: list[Channel] | None = None) -> str:
    header = (
        "# Generated by `yoto alerts build` from alerts/alertmanager.py; do not edit by hand.\n"
        "# Remove the receivers you do not use; URLs are read from files under\n"
        f"# {SECRETS} (mounted by deploy/docker-compose.yml), never written here.\n"
    )
    doc = build_config(channels if channels is not None else deploy_channels())
    return header + yaml.safe_dump(doc, sort_keys=False, width=100)
