"""Grafana dashboards as code: structure, catalog coverage, PromQL, drift, build and push."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from tests.helpers import ROOT
from yoto import catalog
from yoto import config as config_mod
from yoto.cli import main
from yoto.dashboards import units
from yoto.dashboards.live import grafana, promql
from yoto.events import EventKind, Severity

DEPLOYED = ROOT / "deploy" / "grafana" / "dashboards"
FIX = ".venv/bin/yoto dashboards build --out deploy/grafana/dashboards"

# Catalog metrics that no panel needs to show, each with the reason. Empty today: every
# metric is drawn somewhere. Add a name here only with a comment saying why it is not.
NOT_DRAWN: dict[str, str] = {}

BOARDS = grafana.build_all()


def _panels(board):
    return [p for p in grafana.iter_panels(board) if p["type"] != "row"]


def _all_panels():
    return [(name, p) for name, board in BOARDS.items() for p in _panels(board)]


def require(binary: str) -> str:
    """The binary's path; a skip where it is missing, but a failure under CI."""
    path = shutil.which(binary)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{binary} is not installed (CI must run this test; make system-deps)")
        pytest.skip(f"{binary} is not installed (scripts/system-deps.sh installs it)")
    return path


def test_five_dashboards_with_stable_unique_uids():
    assert sorted(BOARDS) == [
        "yoto-data.json",
        "yoto-layers.json",
        "yoto-overview.json",
        "yoto-precision.json",
        "yoto-stability.json",
    ]
    uids = [b["uid"] for b in BOARDS.values()]
    assert len(set(uids)) == len(uids)
    assert all(name == f"{b['uid']}.json" for name, b in BOARDS.items())
    assert grafana.build_all() == BOARDS  # deterministic


def test_every_dashboard_has_datasource_and_run_variables():
    for name, board in BOARDS.items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource", name
        assert variables["datasource"]["query"] == "prometheus"
        run = variables["instance"]
        assert run["query"] == f"query_result({catalog.RUN_INFO.name})"
        assert run["allValue"] == ".*" and run["multi"] and run["includeAll"]
        # the picker shows the run label and passes the instance to the queries
        series = 'yoto_run_info{instance="gpu1:9477",job="yoto",name="n",preset="p",run="r-7"} 1'
        pattern = run["regex"].strip("/").replace("(?<", "(?P<")
        match = re.search(pattern, series)
        assert match and match["value"] == "gpu1:9477" and match["text"] == "r-7"


def test_every_panel_has_a_query_a_catalog_unit_and_a_description():
    grafana_ids = {u.grafana for u in units.UNITS.values()}
    ids = {}
    for name, panel in _all_panels():
        where = f"{name}: {panel['title']!r}"
        assert panel["targets"], where
        assert all(t["expr"].strip() for t in panel["targets"]), where
        assert panel["datasource"]["uid"] == "${datasource}", where
        unit = panel["fieldConfig"]["defaults"]["unit"]
        assert unit in grafana_ids, where
        # the unit is the catalog unit of what the first query reads (or its rate)
        names = sorted(promql.metric_names(panel["targets"][0]["expr"]) & set(catalog.CATALOG))
        if names:
            metric = catalog.CATALOG[names[0]]
            allowed = {units.grafana_unit(metric.unit)}
            if metric.type == "counter" and f"{metric.unit}_per_second" in units.UNITS:
                allowed.add(units.grafana_unit(f"{metric.unit}_per_second"))
            assert unit in allowed, f"{where}: {unit} not the unit of {metric.name}"
            assert metric.help in panel["description"], where
        else:
            assert panel["description"], where
        ids.setdefault(name, []).append(panel["id"])
    for name, board in BOARDS.items():
        all_ids = [p["id"] for p in grafana.iter_panels(board)]
        assert len(set(all_ids)) == len(all_ids), f"{name}: duplicate panel ids"


def test_every_catalog_metric_is_drawn_or_excluded_with_a_reason():
    drawn = set()
    for board in BOARDS.values():
        for expr in grafana.raw_queries(board):
            drawn |= promql.metric_names(expr)
    missing = set(catalog.CATALOG) - drawn - set(NOT_DRAWN)
    assert not missing, f"catalog metrics in no panel: {sorted(missing)}"
    assert set(NOT_DRAWN) <= set(catalog.CATALOG), "NOT_DRAWN names a metric not in the catalog"
    assert not set(NOT_DRAWN) & drawn, "a NOT_DRAWN metric is drawn after all; drop it there"


def test_the_layout_places_every_metric_itself():
    # A new catalog metric is drawn in the Overview's fallback row until someone gives it
    # a place in the layout (grafana.py); this test says when that is due.
    titles = [p["title"] for p in BOARDS["yoto-overview.json"]["panels"]]
    if "Other catalog metrics" in titles:
        fallback = titles[titles.index("Other catalog metrics") + 1 :]
        pytest.fail(f"give these panels a place in the layout (grafana.py): {fallback}")


def test_a_new_catalog_metric_gets_a_fallback_panel(monkeypatch):
    fake = catalog.Metric("yoto_test_widgets_total", "counter", "", "Widgets, for a test.")
    monkeypatch.setitem(catalog.CATALOG, fake.name, fake)
    overview = grafana.build(grafana.boards()[0])
    assert overview["panels"][-2]["title"] == "Other catalog metrics"
    last = overview["panels"][-1]
    assert last["title"] == "Test widgets"
    assert promql.metric_names(last["targets"][0]["expr"]) == {fake.name}


def test_queries_name_only_catalog_metrics_and_always_pick_the_run():
    allowed = set(catalog.CATALOG) | promql.PROMETHEUS_SERIES
    for name, board in BOARDS.items():
        for expr in grafana.raw_queries(board):
            names = promql.metric_names(expr)
            assert names, f"{name}: no metric in {expr!r}"
            assert names <= allowed, f"{name}: {sorted(names - allowed)} in {expr!r}"
            # every selector carries the run matcher
            assert expr.count("{") == expr.count(promql.INSTANCE_MATCHER), expr
            macros = set(re.findall(r"\$\{?(\w+)", expr))
            assert macros <= {"instance", "__rate_interval"}, expr


def test_panel_queries_are_plain_promql():
    board = BOARDS["yoto-stability.json"]
    queries = grafana.panel_queries(board)
    assert len(queries) == len(grafana.raw_queries(board))
    annotations = board["annotations"]["list"]
    assert any("yoto_rollbacks_total" in a["expr"] for a in annotations)
    assert len(queries) > len(annotations)  # panels and annotations both
    for q in queries:
        assert "$" not in q, q
    assert any('instance=~".*"' in q and "[1m]" in q for q in queries)


def test_substitute_refuses_unknown_macros():
    assert promql.substitute('rate(x{instance=~"${instance}"}[$__interval])') == (
        'rate(x{instance=~".*"}[1m])'
    )
    with pytest.raises(ValueError, match="__range_s"):
        promql.substitute("x[$__range_s]")


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('yoto_train_loss{instance=~"$instance"}', {"yoto_train_loss"}),
        (
            'sum by (instance, kind) (increase(yoto_events_total{kind="halt"}[1m])) > 0',
            {"yoto_events_total"},
        ),
        (
            "time() - max by (instance) (yoto_last_step_timestamp_seconds)",
            {"yoto_last_step_timestamp_seconds"},
        ),
        (
            "a * on (instance) group_left (run, name) b and bool c unless d offset 5m",
            {"a", "b", "c", "d"},
        ),
        ('up{job="yoto"} == 0 or vector(0)', {"up"}),
        ('x{l=~"a,b{c}"} / ignoring(l) y', {"x", "y"}),
    ],
)
def test_metric_names(expr, names):
    assert promql.metric_names(expr) == names


def test_helpers_refuse_labels_and_types_the_catalog_does_not_give():
    with pytest.raises(ValueError, match="no label 'layer'"):
        promql.selector(catalog.TRAIN_LOSS, layer="0")
    with pytest.raises(ValueError, match="no label"):
        promql.by(("source",), catalog.LAYER_GRAD_NORM)
    with pytest.raises(ValueError, match="need a counter"):
        promql.rate(catalog.TRAIN_LOSS)
    for metric in catalog.CATALOG.values():
        units.grafana_unit(metric.unit)  # every catalog unit has a Grafana unit


def test_every_expression_parses_in_promtool(tmp_path):
    promtool = require("promtool")
    exprs = sorted({q for b in BOARDS.values() for q in grafana.panel_queries(b)})
    # the run picker's query_result() wraps a PromQL expression too
    exprs.append(f"{catalog.RUN_INFO.name}")
    rules = {
        "groups": [
            {
                "name": "dashboard-queries",
                "rules": [{"record": f"yoto_check:q{i}", "expr": e} for i, e in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    proc = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_checked_in_dashboards_match_the_code(tmp_path):
    grafana.write_all(tmp_path)
    fresh = {p.name: p.read_text(encoding="utf-8") for p in tmp_path.glob("*.json")}
    deployed = {p.name: p.read_text(encoding="utf-8") for p in DEPLOYED.glob("*.json")}
    stale = sorted(set(deployed) - set(fresh))
    assert not stale, f"{stale} are no longer generated: delete them, then run {FIX}"
    drifted = sorted(n for n in fresh if deployed.get(n) != fresh[n])
    assert not drifted, f"deploy/grafana/dashboards is out of date ({drifted}); run: {FIX}"


def test_output_is_deterministic_text():
    text = grafana.dumps(BOARDS["yoto-data.json"])
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert json.loads(text) == BOARDS["yoto-data.json"]
    assert text == grafana.dumps(json.loads(text))  # sorted keys


def test_cli_build_writes_the_files(tmp_path, capsys):
    out = tmp_path / "dash"
    assert main(["dashboards", "build", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(BOARDS)
    for name, board in BOARDS.items():
        assert (out / name).read_text(encoding="utf-8") == grafana.dumps(board)
    assert str(out / "yoto-overview.json") in capsys.readouterr().out


ALPHA_GAUGE = "Weight alpha per layer (latest)"


def _alpha_thresholds(boards: dict) -> tuple[list, str]:
    [gauge] = [p for p in _panels(boards["yoto-layers.json"]) if p["title"] == ALPHA_GAUGE]
    steps = gauge["fieldConfig"]["defaults"]["thresholds"]["steps"]
    return [(s["value"], s["color"]) for s in steps], gauge["description"]


def test_the_alpha_band_is_the_configs():
    steps, text = _alpha_thresholds(BOARDS)
    band = config_mod.Config().probes.spectra
    assert steps == [(None, "red"), (band.alpha_low, "green"), (band.alpha_high, "orange")]
    assert f"{band.alpha_low:g} ≤ alpha ≤ {band.alpha_high:g}" in text
    custom = config_mod.load_config(
        overrides=["probes.spectra.alpha_low=1.5", "probes.spectra.alpha_high=7.25"]
    )
    steps, text = _alpha_thresholds(grafana.build_all(custom))
    assert steps == [(None, "red"), (1.5, "green"), (7.25, "orange")]
    assert "1.5 ≤ alpha ≤ 7.25" in text


def test_cli_build_takes_the_band_from_its_config(tmp_path):
    out = tmp_path / "dash"
    args = ["--set", "probes.spectra.alpha_low=1.5", "--set", "probes.spectra.alpha_high=8"]
    assert main(["dashboards", "build", "--out", str(out), *args]) == 0
    written = {p.name: json.loads(p.read_text(encoding="utf-8")) for p in out.iterdir()}
    steps, _ = _alpha_thresholds(written)
    assert steps == [(None, "red"), (1.5, "green"), (8.0, "orange")]
    assert main(["dashboards", "build", "--out", str(out), "--set", "probes.spectra.alpha=1"]) == 2


# --- push --------------------------------------------------------------------------------
# Grafana itself cannot be installed on this machine (no Debian package, no network for a
# tarball), so push() is tested against this stand-in for the three endpoints of Grafana's
# HTTP API it calls. It records every request so the test can check what was sent.


class FakeGrafana:
    def __init__(self, status: int = 200):
        self.requests: list[dict] = []
        self.folders: list[dict] = []
        self.status = status
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def _reply(self, body, status=None):
                data = json.dumps(body).encode()
                self.send_response(status or fake.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                fake.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": body,
                    }
                )
                return body

            def do_GET(self):
                self._record()
                if self.path.startswith("/api/folders"):
                    return self._reply(fake.folders)
                return self._reply({"message": "not found"}, 404)

            def do_POST(self):
                body = self._record()
                if fake.status != 200:
                    return self._reply({"message": "invalid API key"})
                if self.path == "/api/folders":
                    folder = {"id": len(fake.folders) + 1, **body}
                    fake.folders.append(folder)
                    return self._reply(folder)
                if self.path == "/api/dashboards/db":
                    uid = body["dashboard"]["uid"]
                    return self._reply({"status": "success", "uid": uid, "version": 1})
                return self._reply({"message": "not found"}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def posts(self, path):
        return [r for r in self.requests if r["method"] == "POST" and r["path"] == path]


TOKEN = "glsa_TestOnly_0123456789abcdef"


def test_push_sends_every_dashboard_with_the_token_and_never_prints_it(monkeypatch, capsys, caplog):
    monkeypatch.setenv("GRAFANA_TOKEN", TOKEN)
    caplog.set_level("DEBUG")
    with FakeGrafana() as fake:
        assert main(["dashboards", "push", "--url", fake.url, "--folder", "LLM runs"]) == 0
        assert main(["dashboards", "push", "--url", fake.url, "--folder", "LLM runs"]) == 0
    posts = fake.posts("/api/dashboards/db")
    assert len(posts) == 2 * len(BOARDS)
    assert {p["body"]["dashboard"]["uid"] for p in posts} == {b["uid"] for b in BOARDS.values()}
    for post in posts:
        assert post["headers"]["Authorization"] == f"Bearer {TOKEN}"
        assert post["body"]["overwrite"] is True
        assert post["body"]["dashboard"]["id"] is None
        assert post["body"]["folderUid"] == "yoto-llm-runs"
    assert len(fake.posts("/api/folders")) == 1  # the second push found the folder
    out = capsys.readouterr()
    assert f"pushed {len(BOARDS)} dashboards" in out.out
    assert TOKEN not in out.out + out.err + caplog.text


def test_push_with_basic_auth(monkeypatch):
    monkeypatch.delenv("GRAFANA_TOKEN", raising=False)
    monkeypatch.setenv("GRAFANA_USER", "admin")
    monkeypatch.setenv("GRAFANA_PASSWORD", "s3cret-pw")
    with FakeGrafana() as fake:
        assert main(["dashboards", "push", "--url", fake.url]) == 0
    post = fake.posts("/api/dashboards/db")[0]
    assert post["headers"]["Authorization"].startswith("Basic ")
    assert "folderUid" not in post["body"]


def test_push_without_credentials_is_a_clear_error(monkeypatch, capsys):
    for name in ("GRAFANA_TOKEN", "GRAFANA_USER", "GRAFANA_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    assert main(["dashboards", "push", "--url", "http://127.0.0.1:1"]) == 2
    assert "GRAFANA_TOKEN" in capsys.readouterr().err


def test_push_refused_says_so_without_the_token(monkeypatch, capsys, caplog):
    monkeypatch.setenv("GRAFANA_TOKEN", TOKEN)
    with FakeGrafana(status=401) as fake:
        assert main(["dashboards", "push", "--url", fake.url]) == 2
    err = capsys.readouterr().err
    assert "refused or failed" in err and "Unauthorized" in err
    assert TOKEN not in err + caplog.text


def test_push_refuses_credentials_in_the_url(monkeypatch, capsys):
    monkeypatch.setenv("GRAFANA_TOKEN", TOKEN)
    assert main(["dashboards", "push", "--url", "http://admin:pw@127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "not in --url" in err and "pw@" not in err


# --- every query against a real Prometheus ----------------------------------------------
# The trainer's exporter is tested with a real run in tests/integration; here a stand-in
# exporter serves every catalog metric (as the catalog types it, all label values made up)
# so that the dashboards are checked on their own: each expression must return data.


def _fake_exporter():
    from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

    registry = CollectorRegistry()
    known = {"kind": tuple(EventKind), "severity": tuple(Severity)}
    series = []
    for m in catalog.CATALOG.values():
        if m.type == "counter":  # prometheus-client appends _total itself
            metric = Counter(m.name.removesuffix("_total"), m.help, m.labels, registry=registry)
        else:
            metric = Gauge(m.name, m.help, m.labels, registry=registry)
        # the event kinds the annotations select exist; other labels get two made-up values
        choices = [known.get(label, (f"{label}-0", f"{label}-1")) for label in m.labels]
        values = list(itertools.product(*choices))
        children = [metric.labels(*v) for v in values] if m.labels else [metric]
        series += [(m, child) for child in children]
    server, _thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    stop = threading.Event()

    def tick():
        while not stop.wait(0.2):
            for m, child in series:
                if m.type == "counter":
                    child.inc()
                elif m is catalog.LAST_STEP_TIME:
                    child.set_to_current_time()
                else:
                    child.set(1.5)

    threading.Thread(target=tick, daemon=True).start()
    return server, stop


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(base: str, expr: str) -> list:
    import urllib.parse
    import urllib.request

    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)["data"]["result"]


@pytest.mark.slow
def test_every_query_returns_data_from_a_real_prometheus(tmp_path):
    import time

    binary = require("prometheus")
    server, stop = _fake_exporter()
    config = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": catalog.SCRAPE_JOB,
                "static_configs": [{"targets": [f"127.0.0.1:{server.server_port}"]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    base = f"http://127.0.0.1:{_free_port()}"
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={base.removeprefix('http://')}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # three scrapes, so that rate() and increase() have two points
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                if _query(base, f'count_over_time(up{{job="{catalog.SCRAPE_JOB}"}}[1m]) >= 3'):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus never scraped the exporter"
            time.sleep(0.5)
        empty = []
        for name, board in BOARDS.items():
            for expr in grafana.panel_queries(board):
                if not _query(base, expr):
                    empty.append(f"{name}: {expr}")
        assert not empty, "queries without data:\n" + "\n".join(empty)
        info = _query(base, catalog.RUN_INFO.name)  # what the Run picker reads
        assert {"instance", "run"} <= set(info[0]["metric"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        stop.set()
        server.shutdown()


def test_push_to_nothing_listening_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("GRAFANA_TOKEN", TOKEN)
    port = _free_port()  # nothing listens there
    assert main(["dashboards", "push", "--url", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert f"Grafana at http://127.0.0.1:{port} refused or failed" in err
    assert TOKEN not in err
