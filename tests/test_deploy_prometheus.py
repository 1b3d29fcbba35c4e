"""deploy/prometheus/alerts.yml and deploy/grafana/ses-relay.json: the rules
pass ``promtool check rules`` and their unit tests (``promtool test rules``),
every alert has a case that fires and one that must not, every dashboard
query is valid PromQL, and every metric either names is one that a real
relay's /metrics serves after traffic."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.ses.classify import CREDENTIAL_CODES, NO_CREDENTIALS
from tests.daemon import REPO
from tests.fakeses import FakeSes
from tests.relayd import running_relay
from tests.test_e2e import message, send
from tests.test_metrics import scrape

ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = REPO / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "ses-relay.json"
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*"}
"""What Grafana puts in place of the dashboard's variables."""
NOT_FROM_THE_RELAY = {"up"}
"""Series Prometheus makes itself for each scrape target."""


@pytest.fixture(scope="module")
def promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus; .ci/run does)")
    return tool


def run(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=60, check=False, cwd=REPO
    )


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    queries += [
        variable["query"]["query"]
        for variable in dashboard["templating"]["list"]
        if variable["type"] == "query"
    ]
    return queries


def metric_names(expression: str) -> set[str]:
    """The metrics a PromQL expression (or Grafana's ``label_values``) names:
    every ``ses_relay_*`` word and every name before a ``{`` selector."""
    return set(re.findall(r"\bses_relay_\w+", expression)) | set(
        re.findall(r"\b([a-zA-Z_:][\w:]*)\{", expression)
    )


def test_the_alert_rules_pass_promtool_check(promtool: str) -> None:
    done = run(promtool, "check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_the_alert_rules_pass_their_unit_tests(promtool: str) -> None:
    done = run(promtool, "test", "rules", str(ALERT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_is_tested_firing_and_quiet() -> None:
    cases = [
        case
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    for rule in alert_rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} never fires"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} never stays quiet"


def test_the_credentials_alert_names_every_credential_code() -> None:
    """The codes the relay pauses delivery for (relay/ses/classify.py)."""
    (rule,) = [r for r in alert_rules() if r["alert"] == "SesRelaySesCredentialsRefused"]
    found = re.search(r'code=~"([^"]+)"', rule["expr"])
    assert found is not None
    assert set(found[1].split("|")) == CREDENTIAL_CODES | {NO_CREDENTIALS}


def test_the_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """promtool parses each query as a recording rule's expression."""
    queries = [q for q in dashboard_queries() if not q.startswith("label_values(")]
    for variable, value in GRAFANA_VARIABLES.items():
        queries = [q.replace(variable, value) for q in queries]
    rules = tmp_path / "dashboard.yml"
    recorded = [{"record": f"query:{n}", "expr": query} for n, query in enumerate(queries)]
    rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
    done = run(promtool, "check", "rules", str(rules))
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(queries) > 20


async def test_every_metric_queried_is_served(tmp_path: Path, fake_ses: FakeSes) -> None:
    """A relay that asked SES for its quota and sent a message, with temporary
    credentials, serves every metric the alerts and the dashboard name."""
    expiring = {"AWS_CREDENTIAL_EXPIRATION": "2099-01-01T00:00:00Z"}
    async with running_relay(tmp_path, fake_ses, env=expiring, ses={"max_send_rate": 0}) as relay:
        assert (await send(relay, ["a@example.net"], message()))[0] == 250
        async with asyncio.timeout(10):
            samples = await scrape(relay)
            while ("ses_relay_ses_quota_max_send_rate", ()) not in samples:
                await asyncio.sleep(0.01)
                samples = await scrape(relay)
    served = {name for name, _ in samples}
    expressions = [rule["expr"] for rule in alert_rules()] + dashboard_queries()
    for expression in expressions:
        named = metric_names(expression)
        assert named, f"names no metric: {expression}"
        assert named <= served | NOT_FROM_THE_RELAY, f"not served: {named - served}"
