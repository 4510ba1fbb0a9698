"""Alert rules and the dashboard as code: promtool checks and unit tests, and metric names the worker exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "monitoring"
RULES = MONITORING / "streamserve.rules.yml"
DASHBOARD = MONITORING / "grafana" / "streamserve-dashboard.json"
_METRIC = re.compile(r"\bstreamserve_[a-z_]+")
_SUFFIXES = ("_bucket", "_sum", "_count")
BROKER_METRICS = "streamserve_broker_"
"""Prefix of the metrics `streamserve lag-exporter` serves (not the workers)."""


def promtool() -> str:
    """promtool, installed by scripts/ensure-promtool when missing (Debian's prometheus package)."""
    subprocess.run([str(REPO / "scripts" / "ensure-promtool")], check=False, capture_output=True, timeout=600)
    found = shutil.which("promtool")
    assert found, "promtool not found and scripts/ensure-promtool could not install Debian's prometheus package"
    return found


def panel_queries() -> list[str]:
    """Every PromQL expression of the dashboard: its panels' and its annotations'."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    return exprs + [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]


def queries() -> list[str]:
    """Every PromQL expression of the dashboard and the alert rules."""
    exprs = panel_queries()
    rules = yaml.safe_load(RULES.read_text())
    exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return exprs


TOPIC_LABELLED = {"streamserve_consumer_lag", "streamserve_broker_lag"}
"""Families whose series carry the input topic: the dashboard's $topic filters them (tests/integration/test_observe.py
checks the worker's)."""
MODEL_LABELLED = {
    "streamserve_model_info",
    "streamserve_model_serving",
    "streamserve_drift_psi",
    "streamserve_label_lag_seconds",
    "streamserve_quality",
    "streamserve_quality_estimated",
    "streamserve_quality_pairs",
    "streamserve_quality_floor",
    "streamserve_quality_comparison",
    "streamserve_quality_comparison_verdict",
    "streamserve_quality_comparison_labels_needed",
}
"""Families whose series carry the model name: the dashboard's $model filters them."""
_SELECTOR = re.compile(r"\b(streamserve_[a-z_]+)(\{[^}]*\})?")

MONITOR_FAMILIES = ("streamserve_quality", "streamserve_monitor_", "streamserve_label_lag")
"""Prefixes of the metrics `streamserve monitor` exports (the rest are the worker's)."""


def referenced_metrics(monitor: bool = False) -> set[str]:
    """Metric family names the queries use (histogram series names reduced to their family): the worker's, or
    with `monitor` the monitor's."""
    return {name for name in _referenced() if name.startswith(MONITOR_FAMILIES) == monitor}


def _referenced() -> set[str]:
    names = set()
    for expr in queries():
        for name in _METRIC.findall(expr):
            for suffix in _SUFFIXES:
                if name.endswith(suffix):
                    name = name.removesuffix(suffix)
                    break
            names.add(name)
    return names


def exported_families(scrape: str) -> set[str]:
    """Family names in a Prometheus text scrape, counters with their _total (as queried)."""
    families = set()
    for line in scrape.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            families.add(f"{name}_total" if kind == "counter" and not name.endswith("_total") else name)
    return families


def _run(args: list[str], cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout


def test_promtool_checks_the_rules() -> None:
    out = _run([promtool(), "check", "rules", RULES.name], MONITORING)
    assert "SUCCESS" in out


def test_promtool_unit_tests_of_the_alerts() -> None:
    tests = yaml.safe_load((MONITORING / "streamserve.rules.test.yml").read_text())
    tested = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]}
    rules = yaml.safe_load(RULES.read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule}
    assert alerts - tested == set(), "every alert rule has a promtool unit test"
    _run([promtool(), "test", "rules", "streamserve.rules.test.yml"], MONITORING)


def test_compose_prometheus_config_is_valid(tmp_path: Path) -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (tmp_path / "streamserve.rules.yml").write_text(RULES.read_text())
    config["rule_files"] = [str(tmp_path / "streamserve.rules.yml")]  # where compose mounts it: in the container
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    _run([promtool(), "check", "config", "prometheus.yml"], tmp_path)


def test_every_dashboard_query_is_valid_promql() -> None:
    # promtool parses rule expressions: wrap each panel query in a recording rule and check them all.
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"panel:{i}", "expr": e} for i, e in enumerate(queries())]}
        ]
    }
    path = MONITORING.parent / ".pytest_cache" / "dashboard-queries.rules.yml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(rules))
    _run([promtool(), "check", "rules", str(path)], MONITORING)


@pytest.mark.parametrize("panel", json.loads(DASHBOARD.read_text())["panels"], ids=lambda p: p["title"][:30])
def test_dashboard_panels_are_complete(panel: dict[str, object]) -> None:
    assert panel["targets"], "a panel without a query"
    assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_alertmanager_config_is_valid() -> None:
    promtool()  # scripts/ensure-promtool installs amtool with Debian's prometheus-alertmanager
    amtool = shutil.which("amtool")
    assert amtool, "amtool not found: scripts/ensure-promtool installs Debian's prometheus-alertmanager"
    out = _run([amtool, "check-config", "alertmanager.yml"], MONITORING)
    assert "SUCCESS" in out


def _family(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def test_the_dashboard_has_job_instance_topic_and_model_variables() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance", "topic", "model"} <= set(variables)
    for name in ("job", "instance", "topic", "model"):
        variable = variables[name]
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert variable["query"]["query"] == variable["definition"]
        assert variable["includeAll"], "All must be offered"
        assert variable["allValue"] == ".*", "All must match every series"
        assert variable["definition"].startswith("label_values(")
        assert variable["definition"].endswith(f", {name})")
    # The job list is the alert rules' own selection of streamserve targets (StreamserveTargetDown).
    assert 'up{job=~".*streamserve.*"}' in variables["job"]["definition"]
    assert '"$job"' in variables["instance"]["definition"]
    for name, labelled in (("topic", TOPIC_LABELLED), ("model", MODEL_LABELLED)):
        metrics = set(re.findall(r"streamserve_[a-z_]+", variables[name]["definition"]))
        assert metrics, variables[name]["definition"]
        assert metrics <= labelled, f"${name} lists values of metrics without a {name} label"


def test_every_panel_query_uses_the_variables() -> None:
    """Every metric of every panel and annotation is filtered by $job and $instance, and by $topic and $model
    exactly where its series carry that label (a filter on a label a series lacks would blank the panel)."""
    for expr in panel_queries():
        selectors = _SELECTOR.findall(expr)
        assert selectors, expr
        for name, braces in selectors:
            family = _family(name)
            matchers = {m.strip() for m in braces.strip("{}").split(",")}
            assert {'job=~"$job"', 'instance=~"$instance"'} <= matchers, f"{expr}: {name} ignores $job/$instance"
            assert ('topic=~"$topic"' in matchers) == (family in TOPIC_LABELLED), f"{expr}: $topic on {name}"
            assert ('model=~"$model"' in matchers) == (family in MODEL_LABELLED), f"{expr}: $model on {name}"


def test_model_swaps_are_annotations() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    swaps = [a for a in dashboard["annotations"]["list"] if "expr" in a]
    assert {a["name"] for a in swaps} == {"Model swaps", "Rejected swaps"}
    for annotation in swaps:
        assert annotation["enable"]
        assert annotation["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        (metric,) = set(re.findall(r"streamserve_[a-z_]+", annotation["expr"]))
        # A family the worker exports: tests/integration/test_observe.py checks every queried family in a scrape.
        assert metric == "streamserve_model_swaps_total"
        assert metric in referenced_metrics()
        assert "{{reason}}" in annotation["titleFormat"]
