"""Deployment artefacts (Dockerfile, deploy/): they parse, fit together, and match what a live gateway exports.

The central check: every `gateway_*` metric named anywhere under deploy/ (alert rules, dashboard, docs) is exported
by a real `python -m gateway run` process, so an alert or a panel can never watch a metric that does not exist.
promtool checks run where promtool is installed (Debian: `apt-get install prometheus`) and are skipped otherwise.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "gateway.json"
KUSTOMIZATION = DEPLOY / "kubernetes" / "kustomization.yaml"
GATEWAY_CONFIGS = [DEPLOY / "compose" / "gateway.yaml", DEPLOY / "kubernetes" / "config" / "gateway.yaml"]
SIGNING_KEY_PATH = "/etc/gateway/keys/signing.pem"

YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))
JSON_FILES = sorted(DEPLOY.rglob("*.json"))

# A metric name, not part of a longer identifier (e.g. not `my_gateway_x`, not a recording rule `gateway:x`).
METRIC_REFERENCE = re.compile(r"(?<![A-Za-z0-9_:])gateway_[a-z_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

STARTUP_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 5.0


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# ---------------------------------------------------------------------------------------------- files parse


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_yaml_parses(path: Path) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert documents, f"{_rel(path)} holds no YAML document"


@pytest.mark.parametrize("path", JSON_FILES, ids=_rel)
def test_json_parses(path: Path) -> None:
    assert isinstance(json.loads(path.read_text(encoding="utf-8")), dict)


def test_deploy_has_the_expected_files() -> None:
    """Guards the globs above: a renamed directory must not turn the parse tests into no-ops."""
    for path in (ALERTS, ALERTS_TEST, PROMETHEUS_CONFIG, DASHBOARD, KUSTOMIZATION, *GATEWAY_CONFIGS):
        assert path.is_file(), f"missing {_rel(path)}"
    assert DEPLOY / "compose.yaml" in YAML_FILES


# ---------------------------------------------------------------------------------------------- alerts, dashboard


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_every_alert_has_for_summary_and_description() -> None:
    rules = _alert_rules()
    assert rules
    for rule in rules:
        name = rule["alert"]
        assert rule.get("for"), f"{name}: no `for:` (a single bad scrape would page)"
        annotations = rule.get("annotations") or {}
        assert str(annotations.get("summary", "")).strip(), f"{name}: no summary annotation"
        assert str(annotations.get("description", "")).strip(), f"{name}: no description annotation"
        assert rule.get("labels", {}).get("severity") in ("warning", "critical"), f"{name}: severity"


def _dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels inside a collapsed row
    return panels


def test_dashboard_panels_have_queries() -> None:
    panels = [p for p in _dashboard_panels() if p["type"] != "row"]
    assert panels
    ids = [p["id"] for p in _dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        exprs = [t.get("expr", "").strip() for t in panel.get("targets", [])]
        assert exprs and all(exprs), f"panel {panel['title']!r} has a target without a query"


# ---------------------------------------------------------------------------------------------- kubernetes, compose


def _duration_s(value: str | int | float) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(value).strip())
    return float(match.group(1)) * units[match.group(2)] if match else float(value)


def test_kustomization_references_existing_files() -> None:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text(encoding="utf-8"))
    base = KUSTOMIZATION.parent
    referenced = list(kustomization.get("resources", []))
    for generator in kustomization.get("configMapGenerator", []):
        referenced += [entry.split("=", 1)[-1] for entry in generator.get("files", [])]
    assert referenced
    for name in referenced:
        assert (base / name).is_file(), f"kustomization.yaml names {name}, which does not exist"
    assert "secret.example.yaml" not in referenced, "the placeholder Secret must never be applied"


def test_termination_grace_covers_prestop_and_drain() -> None:
    """SIGKILL must not cut a drain: grace period > preStop sleep + listen.drain_timeout."""
    deployment = yaml.safe_load((DEPLOY / "kubernetes" / "deployment.yaml").read_text(encoding="utf-8"))
    pod = deployment["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "gateway"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    config = yaml.safe_load(GATEWAY_CONFIGS[1].read_text(encoding="utf-8"))
    drain = _duration_s(config.get("listen", {}).get("drain_timeout", "20s"))
    assert pod["terminationGracePeriodSeconds"] > float(command[1]) + drain
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_compose_bind_mounts_exist() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    sources = [
        volume.split(":", 1)[0]
        for service in compose["services"].values()
        for volume in service.get("volumes", [])
        if isinstance(volume, str) and volume.startswith(".")
    ]
    assert sources
    for source in sources:
        assert (DEPLOY / source).exists(), f"compose.yaml mounts {source}, which does not exist under deploy/"


def _run_gateway_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("config", GATEWAY_CONFIGS, ids=_rel)
def test_shipped_gateway_config_passes_check_config(config: Path, tmp_path: Path) -> None:
    """The configs that compose and the ConfigMap mount are valid; the key path points at a fresh key."""
    key = tmp_path / "signing.pem"
    generated = _run_gateway_cli("keys", "generate", "--out", str(key))
    assert generated.returncode == 0, generated.stderr
    text = config.read_text(encoding="utf-8")
    assert SIGNING_KEY_PATH in text
    copy = tmp_path / "gateway.yaml"
    copy.write_text(text.replace(SIGNING_KEY_PATH, str(key)), encoding="utf-8")
    env = {
        **os.environ,
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "INTROSPECTION_SECRET": "test-introspection-secret",
        "GATEWAY_ADMIN_TOKEN": "test-admin-token",
    }
    checked = _run_gateway_cli("check-config", str(copy), env=env)
    assert checked.returncode == 0, f"{_rel(config)}:\n{checked.stdout}{checked.stderr}"


# ---------------------------------------------------------------------------------------------- live gateway


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _get(port: int, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


@dataclass
class LiveRun:
    """What one gateway process showed: its /metrics before stopping and how it stopped."""

    metrics: str
    readyz_status: int
    exit_code: int | None
    stop_seconds: float
    log: str


def _wait_for(port: int, path: str, process: subprocess.Popen[bytes], log: Path) -> int:
    """Poll until `path` answers 200 (bounded by STARTUP_TIMEOUT_S); fail at once if the process exits."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    status = 0
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"gateway exited with {process.returncode} before {path} answered:\n{log.read_text()}")
        try:
            status, _ = _get(port, path)
        except OSError:
            status = 0
        if status == 200:
            return status
        time.sleep(0.1)
    return status


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRun]:
    """Start `python -m gateway run` on free ports, scrape it, then stop it with SIGTERM."""
    workdir = tmp_path_factory.mktemp("live-gateway")
    proxy_port, admin_port = _free_ports(2)
    config = workdir / "gateway.yaml"
    config.write_text(
        f"""
listen: {{host: 127.0.0.1, port: {proxy_port}, drain_timeout: {DRAIN_TIMEOUT_S:g}s}}
admin: {{host: 127.0.0.1, port: {admin_port}}}
log: {{level: info}}
routes:
  - name: deploy-test
    match: {{path_prefix: /}}
    upstream: {{url: "http://127.0.0.1:1"}}
    auth: {{mode: none}}
""",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", "REDIS_URL")}
    env["GATEWAY_ADMIN_TOKEN"] = "test-admin-token"
    log = workdir / "gateway.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(config)],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        healthz = _wait_for(admin_port, "/healthz", process, log)
        assert healthz == 200, f"/healthz not 200 within {STARTUP_TIMEOUT_S}s:\n{log.read_text()}"
        readyz = _wait_for(admin_port, "/readyz", process, log)
        status, metrics = _get(admin_port, "/metrics")
        assert status == 200, metrics
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            exit_code: int | None = process.wait(timeout=DRAIN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            exit_code = None
        stop_seconds = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    yield LiveRun(metrics, readyz, exit_code, stop_seconds, log.read_text(encoding="utf-8", errors="replace"))


def _families(exposition: str) -> dict[str, str]:
    """Metric family name -> HELP text, from the `# HELP` / `# TYPE` lines of the text format."""
    families: dict[str, str] = {}
    for line in exposition.splitlines():
        if line.startswith("# HELP "):
            _, _, name, *rest = line.split(" ", 3)
            families[name] = rest[0].strip() if rest else ""
        elif line.startswith("# TYPE "):
            families.setdefault(line.split(" ")[2], "")
    return families


def _referenced_metrics() -> dict[str, set[str]]:
    """Every gateway_* metric named under deploy/ (histogram series reduced to their family) -> files."""
    referenced: dict[str, set[str]] = {}
    for path in sorted(DEPLOY.rglob("*")):
        if not path.is_file():
            continue
        for name in METRIC_REFERENCE.findall(path.read_text(encoding="utf-8", errors="replace")):
            for suffix in HISTOGRAM_SUFFIXES:
                if name.endswith(suffix):
                    name = name.removesuffix(suffix)
                    break
            referenced.setdefault(name, set()).add(_rel(path))
    return referenced


def test_metrics_referenced_under_deploy_are_exported(live: LiveRun) -> None:
    referenced = _referenced_metrics()
    # The extraction itself works: the dashboard's latency panels name this histogram by its _bucket series.
    assert "gateway_http_request_duration_seconds" in referenced
    exported = set(_families(live.metrics))
    missing = {name: sorted(files) for name, files in sorted(referenced.items()) if name not in exported}
    assert not missing, (
        "metrics referenced under deploy/ but not exported by the gateway:\n"
        + "\n".join(f"  {name}  (in {', '.join(files)})" for name, files in missing.items())
        + f"\nexported: {', '.join(sorted(n for n in exported if n.startswith('gateway_')))}"
    )


def test_exported_gateway_metrics_have_help(live: LiveRun) -> None:
    families = {name: text for name, text in _families(live.metrics).items() if name.startswith("gateway_")}
    assert families, "the gateway exports no gateway_* metric"
    assert not [name for name, text in families.items() if not text], "gateway_* metrics without HELP text"


def test_readyz_is_ready_with_memory_store(live: LiveRun) -> None:
    assert live.readyz_status == 200, live.log


def test_sigterm_exits_zero_within_drain_timeout(live: LiveRun) -> None:
    assert live.exit_code is not None, f"still running {DRAIN_TIMEOUT_S}s after SIGTERM:\n{live.log}"
    assert live.exit_code == 0, live.log


# ---------------------------------------------------------------------------------------------- promtool


def _promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    return subprocess.run(
        [promtool, *map(str, args)], capture_output=True, text=True, timeout=60, check=False, cwd=REPO
    )


def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_unit_tests() -> None:
    result = _promtool("test", "rules", ALERTS_TEST)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config() -> None:
    """prometheus.yml names only alerts.yml beside it, so it checks without the compose stack."""
    result = _promtool("check", "config", PROMETHEUS_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_parses_dashboard_queries(tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, is valid PromQL (checked as a recording rule)."""
    substitutions = {"$__rate_interval": "5m", "$job": ".*", "$instance": ".*", "$route": ".*"}
    rules = []
    for panel in _dashboard_panels():
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in substitutions.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"panel {panel['title']!r}: unknown variable in {expr}"
            rules.append({"record": f"dashboard:panel_{panel['id']}_{target['refId']}", "expr": expr})
    rules_file = tmp_path / "dashboard_rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    result = _promtool("check", "rules", rules_file)
    assert result.returncode == 0, result.stdout + result.stderr
