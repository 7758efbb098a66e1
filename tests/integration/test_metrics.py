"""GET /metrics of a real sidecar: who may read it, what the Prometheus parser reads in it, and the Grafana
dashboard shipped over it (deploy/grafana/sidecar.json). Also: a served sidecar has no demo page."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import promql_parser
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from sidecar.core.protocol import shard_of
from sidecar.publish import Publisher
from sidecar.stats import CONTENT_TYPE_LATEST
from tests.clients import SSEClient
from tests.processes import REPO_ROOT, SidecarProcess
from tests.tokens import guarded_sidecar, mint

SECRET = "metrics-test-secret-" + "x" * 32
METRICS_KEY = "metrics-key-0123456789"
ADMIN_KEY = "admin-key-for-metrics-0123"
PUBLISHER_KEY = "publisher-key-for-metrics-0123"
GRAFANA = REPO_ROOT / "deploy" / "grafana" / "sidecar.json"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, key: str | None = None) -> Samples:
    """Every sample of GET /metrics, as the real Prometheus text parser reads it."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = requests.get(f"{url}/metrics", headers=headers, timeout=5)
    assert response.status_code == 200 and response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def wait_for(check, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def production(tmp_path) -> Iterator[SidecarProcess]:
    env = {"SIDECAR_DEV": "0", "SIDECAR_JWT_SECRET": SECRET, "SIDECAR_METRICS_KEY": METRICS_KEY,
           "SIDECAR_ADMIN_KEY": ADMIN_KEY, "SIDECAR_PUBLISHER_KEY": PUBLISHER_KEY}  # fmt: skip
    with guarded_sidecar(tmp_path, env, (SECRET, METRICS_KEY, ADMIN_KEY, PUBLISHER_KEY)) as (proc, _):
        yield proc


# -- who may read it ----------------------------------------------------------------------------------------
def test_metrics_needs_the_metrics_or_the_admin_key_in_production(production):
    url = f"{production.url}/metrics"
    refused = [None, "Bearer wrong-key-0000000000", f"Bearer {PUBLISHER_KEY}", f"Bearer {mint(SECRET, ['*'])}",
               f"Basic {METRICS_KEY}"]  # fmt: skip
    for authorization in refused:
        headers = {"Authorization": authorization} if authorization else {}
        response = requests.get(url, headers=headers, timeout=5)
        assert (response.status_code, response.json()["error"]) == (401, "unauthorized"), authorization
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="sidecar"')
        assert "sidecar_" not in response.text and "process_" not in response.text  # no detail leaked
    assert requests.get(url, params={"token": METRICS_KEY}, timeout=5).status_code == 401  # keys go in the header
    for key in (METRICS_KEY, ADMIN_KEY):
        assert ("sidecar_messages_read_total", ()) in scrape(production.url, key)


def test_without_a_key_production_disables_metrics_and_serves_no_demo_page(tmp_path):
    env = {"SIDECAR_DEV": "0", "SIDECAR_JWT_SECRET": SECRET}
    with guarded_sidecar(tmp_path, env, (SECRET,)) as (proc, _):
        response = requests.get(f"{proc.url}/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}, timeout=5)
        assert (response.status_code, response.json()["error"]) == (403, "disabled")
        assert "SIDECAR_METRICS_KEY" in response.json()["message"] and "sidecar_" not in response.text
        assert requests.get(f"{proc.url}/demo", timeout=5).status_code == 404  # its buttons need `sidecar demo`
        assert "/metrics is disabled" in proc.log_text()


def test_dev_mode_leaves_metrics_open_and_says_so(shared_sidecar):
    dev = shared_sidecar  # the module's default (dev-mode) sidecar: nothing here changes it
    assert ("sidecar_reader_healthy", ()) in scrape(dev.url)
    assert "anyone may read /metrics" in dev.log_text()
    assert requests.get(f"{dev.url}/demo", timeout=5).status_code == 404


# -- what it says -------------------------------------------------------------------------------------------
def test_the_parsed_metrics_match_the_traffic_and_carry_no_channel_name(redis_server, sidecar_process):
    sidecar = sidecar_process(redis_server.url, SIDECAR_STATS_PATTERNS="orders:*")
    client = SSEClient(sidecar.url, ["orders:1", "user:alice"], mode="event")
    try:
        client.wait(lambda frames: any(f["_event"] == "ready" for f in frames))
        pub = Publisher.from_url(redis_server.url)
        started = time.time()
        for i in range(25):
            pub.event("orders:1", "tick", {"i": i})
        for _ in range(5):
            pub.event("user:alice", "tick")
        for i in range(7):
            pub.event(f"orders:{i + 100}", "tick")  # nobody listens: published, not delivered
        client.wait(lambda frames: len(client.messages()) == 30)
        # Socket writes are observed after they return: wait until each delivery's write is in the histogram.
        wait_for(lambda: scrape(sidecar.url)[("sidecar_delivered_total", (("pattern", "orders:*"),))] == 25)
        got = scrape(sidecar.url)
    finally:
        client.close()
    orders, other = (("pattern", "orders:*"),), (("pattern", "*"),)
    assert got[("sidecar_published_total", orders)] == 32 and got[("sidecar_published_total", other)] == 5
    assert got[("sidecar_delivered_total", orders)] == 25 and got[("sidecar_delivered_total", other)] == 5
    assert got[("sidecar_subscribers", orders)] == 1 and got[("sidecar_subscribers", other)] == 1
    assert got[("sidecar_messages_read_total", ())] == 37
    assert got[("sidecar_connections", (("transport", "sse"),))] == 1
    buckets = [v for (name, labels), v in got.items() if name == "sidecar_delivery_latency_seconds_bucket"]
    assert buckets == sorted(buckets) and len(buckets) == 14  # cumulative, up to +Inf
    count = got[("sidecar_delivery_latency_seconds_count", ())]
    assert 1 <= count <= 30 and buckets[-1] == count and got[("sidecar_delivery_latency_seconds_sum", ())] > 0
    shard = (("shard", str(shard_of("orders:1", 16))),)
    assert got[("sidecar_reader_position_timestamp_seconds", shard)] >= int(started)
    assert got[("sidecar_reader_healthy", ())] == 1 and got[("sidecar_reader_reconnects_total", ())] == 0
    text = requests.get(f"{sidecar.url}/metrics", timeout=5).text
    assert "alice" not in text and "orders:1" not in text


# -- the Grafana dashboard ----------------------------------------------------------------------------------
# Grafana's variables, replaced by values of their kind so that the PromQL parser reads the queries.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": ".*"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads, by the PromQL parser (a syntax error raises ValueError)."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, expr
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def test_metric_names_reads_promql():
    expr = ('histogram_quantile(0.95, sum by (le) (rate(sidecar_delivery_latency_seconds_bucket{job=~"$job"}'
            '[$__rate_interval]))) - on (shard) max(up offset 5m) + time()')  # fmt: skip
    assert metric_names(expr) == {"sidecar_delivery_latency_seconds_bucket", "up"}
    with pytest.raises(ValueError):
        metric_names("sum(rate(sidecar_published_total[1m])")


def dashboard_queries(doc: dict) -> list[str]:
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    variables = [v["definition"] for v in doc["templating"]["list"] if v["type"] == "query"]
    return exprs + [re.sub(r"label_values\((\w+),.*", r"\1", v) for v in variables]


def test_the_grafana_dashboard_reads_only_metrics_a_real_sidecar_exports(redis_server, sidecar_process):
    doc = orjson.loads(Path(GRAFANA).read_bytes())
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])
    assert all(p["targets"] and p["datasource"]["uid"] == "${datasource}" for p in panels)
    used = set().union(*(metric_names(q) for q in dashboard_queries(doc)))
    wanted = {"sidecar_published_total", "sidecar_delivered_total", "sidecar_delivery_latency_seconds_bucket",
              "sidecar_connections", "sidecar_reader_position_timestamp_seconds", "sidecar_rejected_total",
              "sidecar_slow_dropped_frames_total"}  # fmt: skip
    assert wanted <= used  # rates per pattern, delivered vs published, latency, connections, lag, admission, drops
    assert any("histogram_quantile(0.99" in q for q in dashboard_queries(doc))

    sidecar = sidecar_process(redis_server.url, SIDECAR_STATS_PATTERNS="grafana:*")
    client = SSEClient(sidecar.url, ["grafana:1"], mode="event")
    try:
        client.wait(lambda frames: any(f["_event"] == "ready" for f in frames))
        Publisher.from_url(redis_server.url).event("grafana:1", "tick")
        client.wait(lambda frames: len(client.messages()) == 1)
        exported = {name for name, _ in scrape(sidecar.url)}  # names with a sample, not only a HELP line
    finally:
        client.close()
    assert used <= exported, sorted(used - exported)
