"""The operator's picture: deploy/grafana/postback-relay.json and deploy/prometheus/alerts.yml.

Every query of the dashboard and every alert names only metrics that a running `postback-relay
metrics` serves (scraped, not listed by hand); promtool checks the rules and runs their unit
tests (deploy/prometheus/alerts_test.yml); every runbook's `postback-relay` command parses."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import click
import promql_parser
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from config.keys import RedisKeys
from tests.helpers import ROOT, cli_env, one_of_each_kind, scrape, start_metrics
from workers.cli.main import main as cli_main
from workers.metrics import MetricsRecorder

DASHBOARD = ROOT / "deploy" / "grafana" / "postback-relay.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (Debian's prometheus package ships it; .ci/run installs it)",
)
# Grafana's variables, as a query sees them once Grafana has filled them in.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$destination": ".*"}


@pytest.fixture(scope="module")
def served(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """Metric family -> the sample names a real `postback-relay metrics` serves for it, over a
    file with a destination of every kind and a reconcile source."""
    tmp = tmp_path_factory.mktemp("metrics")
    (tmp / "xmp-token").write_text("token")
    destinations = tmp / "destinations.toml"
    destinations.write_text(one_of_each_kind("http://127.0.0.1:9", tmp / "xmp-token"))
    client = redis.Redis.from_url(redis_url)
    with client.pipeline() as pipe:  # the last-success time is served once a run has read
        MetricsRecorder(RedisKeys("pr")).reconcile_run(pipe, "main", "done", time.time())
        pipe.execute()
    proc, url = start_metrics(cli_env(redis_url, destinations))
    try:
        text = scrape(url, proc)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        client.close()
    return {
        family.name: {sample.name for sample in family.samples}
        for family in text_string_to_metric_families(text)
        if family.name.startswith("postback_relay_")
    }


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects, from its syntax tree (promql-parser)."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def dashboard_queries() -> dict[str, str]:
    """Where -> expression: every panel target and every query variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = {
        f"panel {panel['title']!r} {target['refId']}": target["expr"]
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
    }
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found = re.fullmatch(r"label_values\((\w+),\s*\w+\)", variable["query"]["query"])
            assert found, variable["query"]
            queries[f"variable {variable['name']}"] = found.group(1)
    return queries


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"]
            for rule in group["rules"]]  # fmt: skip


def test_the_metric_names_of_a_query_come_from_its_syntax_tree() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (destination, le) (rate(a_bucket{destination=~"$destin'
        'ation", le!="x"}[$__rate_interval]))) > 3 and on (queue) time() - b offset 5m unless c'
    )
    assert metric_names(expr) == {"a_bucket", "b", "c"}


@pytest.mark.integration
def test_every_dashboard_query_names_metrics_the_endpoint_serves(
    served: dict[str, set[str]],
) -> None:
    sample_names = set().union(*served.values())
    queries = dashboard_queries()
    for where, expr in queries.items():
        names = metric_names(expr)
        assert names, where
        assert names <= sample_names, (where, names - sample_names, sorted(sample_names))
    # ...and every metric the endpoint serves is on the dashboard.
    on_dashboard = set().union(*(metric_names(expr) for expr in queries.values()))
    assert {family for family, names in served.items() if not names & on_dashboard} == set()


@pytest.mark.integration
def test_every_alert_names_metrics_the_endpoint_serves(served: dict[str, set[str]]) -> None:
    sample_names = set().union(*served.values())
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= sample_names, (rule["alert"], names - sample_names)


def test_the_dashboard_has_the_panels_on_call_needs_over_a_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 39  # Grafana 10.4 and later
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = [p for p in _panels(dashboard["panels"]) if p["type"] != "row"]
    titles = {p["title"] for p in panels}
    assert {
        "Deliveries per destination and outcome", "Success ratio",
        "Produce-to-delivered latency (p50, p90, p99)", "Queue depth", "Delay set",
        "Deliveries outstanding", "Dead letters", "Paused destinations",
    } <= titles  # fmt: skip
    ids = [p["id"] for p in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))
    cells = [
        (p["title"], x, y)
        for p in _panels(dashboard["panels"])
        for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
        for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])
    ]
    assert all(x < 24 for _, x, _ in cells)  # Grafana's grid is 24 columns wide
    assert len({(x, y) for _, x, y in cells}) == len(cells), "panels overlap"
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
    latency = next(p for p in panels if p["title"].startswith("Produce-to-delivered"))
    quantiles = [re.match(r"histogram_quantile\(([0-9.]+),", t["expr"]) for t in latency["targets"]]
    assert [float(q.group(1)) for q in quantiles if q] == [0.5, 0.9, 0.99]


def test_each_alert_has_a_runbook_whose_commands_parse() -> None:
    """Each `postback-relay ...` in a runbook is a real command with options it accepts."""
    rules = alert_rules()
    assert {r["alert"] for r in rules} == {
        "PostbackRelayQueueWithoutConsumer", "PostbackRelayDeadLettersGrowing",
        "PostbackRelayDestinationPaused", "PostbackRelaySuccessRatioLow",
        "PostbackRelayDeliveryLatencyHigh", "PostbackRelayReconcilerFailing",
        "PostbackRelayReconcilerStale",
    }  # fmt: skip
    for rule in rules:
        runbook = rule["annotations"]["runbook"]
        filled = re.sub(r"\{\{ \$labels\.(\w+) \}\}", r"\1-name", runbook)
        filled = filled.replace("<kind>", "templated")
        commands = re.findall(r"`postback-relay ([^`]+)`", " ".join(filled.split()))
        assert commands, rule["alert"]
        for command in commands:
            _parse(shlex.split(command))


def _parse(args: list[str]) -> None:
    """Resolve the subcommands and parse the leaf's options and arguments, as the CLI would,
    without running it."""
    command: click.Command = cli_main
    path = ["postback-relay"]
    while isinstance(command, click.Group):
        assert args, path
        assert args[0] in command.commands, (path, args)
        path.append(args[0])
        command, args = command.commands[args[0]], args[1:]
    with command.make_context(" ".join(path), list(args)):
        pass


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_of_every_alert_pass() -> None:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "test", "rules", ALERTS_TEST.name],
        capture_output=True, text=True, check=False, cwd=ALERTS_TEST.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    assert tests["rule_files"] == [ALERTS.name]
    cases = [case for test in tests["tests"] for case in test["alert_rule_test"]]
    for rule in alert_rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} never fires"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} always fires"
        for case in mine:
            for alert in case["exp_alerts"]:
                assert set(alert["exp_annotations"]) == {"summary", "runbook"}
