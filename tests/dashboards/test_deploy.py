"""deploy/: Prometheus configs pass promtool, compose and provisioning agree with each other
and with the dashboards, the multi-node target script writes valid file_sd files."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.dashboards.test_grafana import require
from tests.helpers import ROOT
from yoto import catalog
from yoto.dashboards.live import grafana

DEPLOY = ROOT / "deploy"
RULES = Path("prometheus/rules/yoto-rules.yml")  # written by the alert-rules part of issue 6
MULTINODE = DEPLOY / "multinode"


def _load_targets():
    spec = importlib.util.spec_from_file_location("yoto_targets", MULTINODE / "targets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


targets = _load_targets()


def _deploy_copy(tmp_path: Path) -> Path:
    """deploy/ as is when the generated rules file is there; otherwise a copy with an empty
    rules file in its place, so the rest of the config is still checked."""
    if (DEPLOY / RULES).is_file():
        return DEPLOY
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY / "prometheus", copy / "prometheus")
    shutil.copytree(MULTINODE, copy / "multinode")
    (copy / RULES).parent.mkdir(parents=True, exist_ok=True)
    (copy / RULES).write_text("groups: []\n", encoding="utf-8")
    return copy


def _promtool_check_config(promtool: str, config: Path) -> str:
    proc = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_promtool_accepts_the_compose_prometheus_config(tmp_path):
    promtool = require("promtool")
    root = _deploy_copy(tmp_path)
    out = _promtool_check_config(promtool, root / "prometheus" / "prometheus.yml")
    assert "1 rule files found" in out


def test_promtool_accepts_the_multinode_config_with_generated_targets(tmp_path):
    promtool = require("promtool")
    root = tmp_path / "copy"
    shutil.copytree(_deploy_copy(tmp_path), root)
    hostfile = MULTINODE / "hostfile.example"
    out = root / "multinode" / "targets" / "job-1.json"
    assert targets.main(["--hostfile", str(hostfile), "--out", str(out), "--label", "a=b"]) == 0
    assert targets.main(["--nodelist", "gpu[01-02]", "--out", str(out.with_name("2.json"))]) == 0
    result = _promtool_check_config(promtool, root / "multinode" / "prometheus.yml")
    assert "SUCCESS" in result
    # promtool reads the file_sd files too: a bad label name would fail the check
    bad = out.with_name("bad.json")
    bad.write_text(json.dumps([{"targets": ["x:1"], "labels": {"bad-name": "1"}}]))
    proc = subprocess.run(
        [promtool, "check", "config", str(root / "multinode" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0


PROMETHEUS_CONFIGS = (DEPLOY / "prometheus" / "prometheus.yml", MULTINODE / "prometheus.yml")


def test_scrape_job_and_intervals_match_the_dashboards():
    for config in PROMETHEUS_CONFIGS:
        prom = _yaml(config)
        assert prom["global"]["scrape_interval"] == "15s"
        jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
        assert catalog.SCRAPE_JOB in jobs, config
        assert prom["rule_files"], config
        assert (config.parent / prom["rule_files"][0]).resolve() == (DEPLOY / RULES).resolve()
    compose_job = _yaml(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"][0]
    assert compose_job["static_configs"][0]["targets"] == ["host.docker.internal:9477"]
    datasource = _yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    (ds,) = datasource["datasources"]
    assert ds["type"] == "prometheus" and ds["isDefault"]
    assert ds["jsonData"]["timeInterval"] == "15s"


def test_the_scrape_job_is_named_once_in_the_catalog():
    """The trainers' job in every deploy config, the dashboards' and the alert rules'
    selectors and the configs' own comments all say catalog.SCRAPE_JOB."""
    said = re.compile(r'job="([^"]*)"')
    for config in PROMETHEUS_CONFIGS:
        prom = _yaml(config)
        assert [j["job_name"] for j in prom["scrape_configs"]] == [catalog.SCRAPE_JOB], config
        assert set(said.findall(config.read_text(encoding="utf-8"))) <= {catalog.SCRAPE_JOB}
    selected = f'job="{catalog.SCRAPE_JOB}"'
    dashboards = [e for b in grafana.build_all().values() for e in grafana.raw_queries(b)]
    assert any(selected in e for e in dashboards)
    rules_text = (DEPLOY / RULES).read_text(encoding="utf-8")
    assert selected in rules_text
    for text in (*dashboards, rules_text):
        assert set(said.findall(text)) <= {catalog.SCRAPE_JOB}, text
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    named = re.findall(r"job `([^`]*)`", readme)
    assert named and set(named) == {catalog.SCRAPE_JOB}


def _bind_mounts(service: dict) -> dict[str, str]:
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = source
    return mounts


def test_compose_mounts_the_configs_grafana_and_prometheus_read():
    compose = _yaml(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"prometheus", "alertmanager", "grafana"}

    prom = services["prometheus"]
    mounts = _bind_mounts(prom)
    assert mounts["/etc/prometheus"] == "./prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert "host.docker.internal:host-gateway" in prom["extra_hosts"]
    alerting = _yaml(DEPLOY / "prometheus/prometheus.yml")["alerting"]["alertmanagers"]
    assert alerting[0]["static_configs"][0]["targets"] == ["alertmanager:9093"]

    am = services["alertmanager"]
    assert _bind_mounts(am)["/etc/alertmanager"] == "./alertmanager"
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in am["command"]

    graf = _bind_mounts(services["grafana"])
    provisioning = DEPLOY / graf["/etc/grafana/provisioning"]
    provider = _yaml(provisioning / "dashboards" / "yoto.yml")["providers"][0]
    board_dir = provider["options"]["path"]
    assert DEPLOY / graf[board_dir] == DEPLOY / "grafana" / "dashboards"
    assert sorted(p.name for p in (DEPLOY / graf[board_dir]).glob("*.json")) == sorted(
        grafana.build_all()
    )
    ds = _yaml(provisioning / "datasources" / "prometheus.yml")["datasources"][0]
    assert ds["url"] == "http://prometheus:9090"
    for target, source in (*_bind_mounts(prom).items(), *graf.items()):
        assert (DEPLOY / source).exists(), f"{source} (mounted at {target}) is missing"


def test_readme_says_how_the_trainer_must_listen():
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    assert "--metrics-addr 0.0.0.0:9477" in text
    for needle in ("yoto dashboards build", "yoto dashboards push", "targets.py", "rank 0"):
        assert needle in text


@pytest.mark.parametrize("script", ["yoto.sbatch", "deepspeed-launch.sh"])
def test_launch_scripts_parse_and_expose_rank0_metrics(script):
    path = MULTINODE / script
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = path.read_text(encoding="utf-8")
    assert '--metrics-addr "0.0.0.0:$METRICS_PORT"' in text
    assert "targets.py" in text and "rm -f" in text  # registered, then removed at exit


# --- targets.py --------------------------------------------------------------------------


def test_hostfile_first_host_is_the_target():
    hosts = targets.read_hostfile(
        "# comment\n\nnode7 slots=8  # rank 0 here\nnode2 slots=8\nnode3\n"
    )
    assert hosts == ["node7", "node2", "node3"]
    groups = targets.target_groups(hosts, 9500, {"slurm_job_id": "42"})
    assert groups == [
        {
            "targets": ["node7:9500"],
            "labels": {"role": "rank0", "nodes": "3", "slurm_job_id": "42"},
        }
    ]


@pytest.mark.parametrize("text", ["", "# only comments\n", "a slots=8\na slots=8\n", "a gpus=8\n"])
def test_bad_hostfiles_are_refused(text):
    with pytest.raises(ValueError):
        targets.read_hostfile(text)


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node001", ["node001"]),
        ("gpu[001-003,007]", ["gpu001", "gpu002", "gpu003", "gpu007"]),
        ("a[1-2],login5,b[09-10]", ["a1", "a2", "login5", "b09", "b10"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ],
)
def test_slurm_nodelists_expand_like_scontrol(nodelist, hosts):
    assert targets.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", "gpu[1-2", "gpu1-2]", "gpu[3-1]", "gpu[a-b]"])
def test_bad_nodelists_are_refused(nodelist):
    with pytest.raises(ValueError):
        targets.expand_nodelist(nodelist)


def test_bad_labels_and_ports_are_refused():
    with pytest.raises(ValueError, match="label name"):
        targets.target_groups(["a"], labels={"bad-name": "x"})
    with pytest.raises(ValueError, match="label name"):
        targets.target_groups(["a"], labels={"__address__": "x"})
    with pytest.raises(ValueError, match="port"):
        targets.target_groups(["a"], port=70000)


def test_script_runs_standalone_and_writes_the_file(tmp_path):
    # Run with the system's Python in isolated mode: the script must not need yoto,
    # since it runs on login nodes where yoto is not installed.
    python = shutil.which("python3") or sys.executable
    out = tmp_path / "t" / "job.json"
    proc = subprocess.run(
        [python, "-I", str(MULTINODE / "targets.py"), "--nodelist", "n[3-4]", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())[0]["targets"] == ["n3:9477"]
    assert [p.name for p in out.parent.iterdir()] == ["job.json"]  # no temp file left
    proc = subprocess.run(
        [python, "-I", str(MULTINODE / "targets.py"), "--nodelist", "n[3-"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "unbalanced" in proc.stderr
