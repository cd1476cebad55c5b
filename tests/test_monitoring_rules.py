"""`monitoring/`: the Prometheus alert rules pass `promtool check rules` and `promtool test rules` (each alert fires on
a series that should fire it and stays silent on one that should not), and the Grafana dashboard asks only for
metrics that the server exports. promtool comes from Debian's `prometheus` package (.ci/run installs it)."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

MONITORING = Path(__file__).resolve().parents[1] / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
# Ray Serve's metrics and the app's (serve.api: COUNTERS and GAUGES), as Prometheus names them
EXPORTED = {"ray_serve_num_http_requests_total", "ray_serve_num_http_error_requests_total",
            "ray_serve_http_request_latency_ms_bucket", "ray_serve_deployment_replica_healthy",
            "ray_sentiment_predictions_total", "ray_sentiment_errors_total", "ray_sentiment_live_signal",
            "ray_sentiment_reference_signal"}
PROMQL_WORDS = {"sum", "rate", "avg", "by", "abs", "and", "on", "or", "min", "max", "absent", "histogram_quantile",
                "max_over_time", "le", "signal", "error_code", "label", "deployment", "model_version"}


def metric_names(expr: str) -> set[str]:
    "The metric names in a PromQL expression: identifiers that are neither functions, keywords nor label names."
    expr = re.sub(r'\{[^}]*\}', "", re.sub(r'"[^"]*"', "", expr))  # label matchers and strings out
    return {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr) if w not in PROMQL_WORDS and not w.isdigit()
            and not re.fullmatch(r"\d+[smhd]", w)} - {"m", "h", "s"}


def rules() -> list[dict]:
    return [r for g in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"] for r in g["rules"]]


@needs_promtool
def test_promtool_accepts_the_rules():
    out = subprocess.run([PROMTOOL, "check", "rules", str(MONITORING / "alerts.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout + out.stderr


@needs_promtool
def test_each_alert_fires_when_it_should_and_only_then():
    out = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yml"], capture_output=True, text=True,
                         cwd=MONITORING)
    assert out.returncode == 0, out.stdout + out.stderr
    tests = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["tests"]
    cases = [(t["alertname"], bool(t["exp_alerts"])) for case in tests for t in case["alert_rule_test"]]
    for rule in rules():  # every alert has a case that fires it and one that does not
        assert (rule["alert"], True) in cases and (rule["alert"], False) in cases, rule["alert"]


@needs_promtool
def test_the_rule_tests_can_fail(tmp_path):
    for name in ("alerts.yml", "alerts_test.yml"):
        shutil.copy(MONITORING / name, tmp_path / name)
    loose = (tmp_path / "alerts.yml").read_text().replace("> 0.15", "> 0.5")  # a drift bound too wide to fire
    (tmp_path / "alerts.yml").write_text(loose)
    out = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yml"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0 and "SentimentLabelShareDrift" in out.stdout + out.stderr


def test_the_rules_and_the_dashboard_ask_only_for_exported_metrics():
    assert metric_names('sum(rate(ray_serve_num_http_requests_total{a="b"}[5m])) > 0.01') == \
        {"ray_serve_num_http_requests_total"}
    for rule in rules():
        assert metric_names(rule["expr"]) <= EXPORTED, (rule["alert"], metric_names(rule["expr"]) - EXPORTED)
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for expr in exprs:
        assert metric_names(expr) <= EXPORTED, (expr, metric_names(expr) - EXPORTED)
    used = set().union(*map(metric_names, exprs))
    assert {"ray_sentiment_live_signal", "ray_sentiment_reference_signal", "ray_serve_deployment_replica_healthy"} <= used


def test_the_app_exports_the_metrics_the_rules_read():
    from sentiment_nb.serve.api import COUNTERS, GAUGES

    app_metrics = {f"ray_{name}_total" for name, _, _ in COUNTERS.values()} | {f"ray_sentiment_{k}_signal" for k in GAUGES}
    assert app_metrics == {m for m in EXPORTED if m.startswith("ray_sentiment")}
