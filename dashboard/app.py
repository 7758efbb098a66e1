"""The live dashboard: channel traffic, latency, connections, the throttle and the herd, from the stats stream.

Served: ``panel serve dashboard/app.py`` or ``sidecar dashboard`` (settings from ``REDIS_URL`` and
``SIDECAR_*``; see docs/dashboard.md). In a notebook::

    from dashboard.app import dashboard
    dashboard()

Each browser session shares one reader of the stats stream per process (:func:`shared_feed`) and refreshes
twice a second. Plots grow with ``ColumnDataSource.stream`` (one new point per settled second) and the
histogram with ``patch``: nothing is redrawn whole, except once when a click changes the channel filter.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `panel serve dashboard/app.py` runs this file as a script, not as a module:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, so that `dashboard` imports
    __package__ = "dashboard"  # PEP 366: the relative imports below resolve in the checkout's package

import orjson  # noqa: E402
import pandas as pd  # noqa: E402
import panel as pn  # noqa: E402
from bokeh.models import ColumnDataSource, DataRange1d, HoverTool  # noqa: E402
from bokeh.plotting import figure  # noqa: E402

from .feed import DashboardConfig, StatsFeed, redis_client  # noqa: E402
from .policy import AdminAPI, PolicyView, read_policy, with_rule  # noqa: E402
from .sources import LATENCY_BOUNDS_MS, Point, ReplicaRow, Window, bucket_labels  # noqa: E402

REFRESH_MS = 500
HISTOGRAM_SECONDS = 10
TOP_SECONDS = 10
WINDOWS = {"5 min": 300, "10 min": 600, "15 min": 900}
MAX_BINS = 3600  # points kept per series (rollover)
POLICY_EVERY = 2.0  # seconds between reads of the throttle policy
REPLICA_COLUMNS = ["replica", "status", "SSE", "WS", "connections", "subscribers", "delivered/s", "reader",
                   "restarts", "uptime (s)"]  # fmt: skip
CHANNEL_COLUMNS = ["pattern", "published/s", "delivered/s", "subscribers", "coalesced/s", "dropped/s",
                   "pokes delayed/s", "pulls/s"]  # fmt: skip


def shared_feed(config: DashboardConfig) -> StatsFeed:
    """One :class:`StatsFeed` per process and Redis, shared by every session."""

    def make() -> StatsFeed:
        client = redis_client(config, timeout=1.0)
        return StatsFeed(
            client, config.stats_key, span=max(config.window, max(WINDOWS.values())), stale_after=config.stale_after
        )

    return pn.state.as_cached(f"sidecar-stats-feed:{config.redis_url}:{config.stats_key}", make)


def _ms(t: int) -> float:
    return t * 1000.0


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _columns(points: list[Point]) -> dict[str, dict[str, list[Any]]]:
    """The data of every time-series source, from points."""
    t = [_ms(p.t) for p in points]  # one copy per source below: stream() extends columns in place
    return {
        "rates": {"t": list(t), "published": [p.published for p in points], "delivered": [p.delivered for p in points]},
        "latency": {
            "t": list(t),
            "p50": [_nan(p.p50) for p in points],
            "p95": [_nan(p.p95) for p in points],
            "p99": [_nan(p.p99) for p in points],
        },
        "connections": {"t": list(t), "sse": [p.sse for p in points], "ws": [p.ws for p in points]},
        "herd": {
            "t": list(t),
            "pending": [p.pending for p in points],
            "pulled": [p.pulled for p in points],
            "coalesced": [p.coalesced for p in points],
            "poke_delayed": [p.poke_delayed for p in points],
        },
    }


def _figure(title: str, x_range: DataRange1d, height: int = 260) -> Any:
    fig = figure(
        title=title,
        x_axis_type="datetime",
        x_range=x_range,
        height=height,
        sizing_mode="stretch_width",
        tools="pan,xwheel_zoom,reset,save",
        toolbar_location="right",
    )
    fig.y_range.start = 0  # rates, counts and latencies: a zero baseline keeps small wiggles small
    return fig


def _status(r: ReplicaRow) -> str:
    return f"STALE ({r.age:.0f} s)" if r.stale else f"stopped ({r.age:.0f} s ago)" if r.stopped else "live"


def _gone(replicas: list[ReplicaRow]) -> str:
    """What is not live, e.g. "2 stale, 1 stopped"; "" when every replica is."""
    stale, stopped = sum(r.stale for r in replicas), sum(r.stopped for r in replicas)
    return ", ".join(f"{n} {what}" for n, what in ((stale, "stale"), (stopped, "stopped")) if n)


def _mark_stale(row: pd.Series) -> list[str]:
    stale = str(row.get("status", "")).startswith("STALE")
    return ["background-color: #fde2e1; color: #8a1c13" if stale else "" for _ in row]


def _table(columns: list[str], max_height: int, **options: Any) -> pn.widgets.Tabulator:
    return pn.widgets.Tabulator(
        pd.DataFrame(columns=columns),
        show_index=False,
        disabled=True,
        max_height=max_height,
        layout="fit_data_stretch",
        sizing_mode="stretch_width",
        **options,
    )


def _legend(fig: Any) -> None:
    fig.legend.location = "top_left"
    fig.legend.background_fill_alpha = 0.6
    fig.legend.click_policy = "hide"


class Dashboard:
    """One session's view. ``refresh()`` brings it up to date; ``panel()`` lays it out."""

    def __init__(self, config: DashboardConfig, feed: StatsFeed, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.feed = feed
        self.clock = clock
        self.pattern: str | None = None  # the channel filter; None: every channel
        self.admin = AdminAPI(config.sidecar_url, config.admin_key)
        self._policy_at = 0.0
        self.policy = PolicyView()
        self._build()
        now = clock()
        self._poll(now, force=True)
        self.end = self.feed.window.settled(now)  # the first second not yet plotted
        self._reload()
        self._update_tables(now)
        self._update_policy(now, force=True)

    # -- layout ---------------------------------------------------------------------------------------------
    def _build(self) -> None:
        window = int(self.config.window)
        self.sources = {name: ColumnDataSource(data, name=name) for name, data in _columns([]).items()}
        self.histogram = ColumnDataSource(
            {"bucket": bucket_labels(), "count": [0.0] * len(LATENCY_BOUNDS_MS)}, name="histogram"
        )

        # One x range for every time series: they scroll together, and the window choice sets it once.
        self.x_range = DataRange1d(follow="end", follow_interval=window * 1000, range_padding=0)
        self.rates_fig = _figure("messages/s (all channels)", self.x_range)
        src = self.sources["rates"]
        self.rates_fig.line("t", "published", source=src, legend_label="published/s", line_width=2, color="#1f77b4")
        self.rates_fig.line(
            "t", "delivered", source=src, legend_label="delivered/s", line_width=2, color="#2ca02c", line_dash="dashed"
        )

        self.latency_fig = _figure("latency publish \u2192 socket (ms, all channels)", self.x_range)
        src = self.sources["latency"]
        for q, color in (("p50", "#2ca02c"), ("p95", "#ff7f0e"), ("p99", "#d62728")):
            self.latency_fig.line("t", q, source=src, legend_label=q, line_width=2, color=color)

        self.hist_fig = figure(
            title=f"latency histogram, last {HISTOGRAM_SECONDS} s (ms)",
            x_range=bucket_labels(),
            height=260,
            sizing_mode="stretch_width",
            tools="save",
            toolbar_location=None,
        )
        self.hist_fig.vbar(x="bucket", top="count", source=self.histogram, width=0.8, color="#9467bd")
        self.hist_fig.add_tools(HoverTool(tooltips=[("bucket", "@bucket ms"), ("writes", "@count{0}")]))
        self.hist_fig.xaxis.major_label_orientation = 0.8

        self.conn_fig = _figure("connections by transport", self.x_range, height=220)
        src = self.sources["connections"]
        self.conn_fig.line("t", "sse", source=src, legend_label="SSE", line_width=2, color="#1f77b4")
        self.conn_fig.line("t", "ws", source=src, legend_label="WebSocket", line_width=2, color="#ff7f0e")

        self.herd_fig = _figure("herd: pokes pending, pulls/s at the state endpoint", self.x_range, height=220)
        src = self.sources["herd"]
        self.herd_fig.line("t", "pending", source=src, legend_label="pokes pending", line_width=2, color="#d62728")
        self.herd_fig.line("t", "pulled", source=src, legend_label="pulls/s", line_width=2, color="#1f77b4")
        self.herd_fig.line("t", "poke_delayed", source=src, legend_label="pokes delayed/s", color="#8c564b")
        self.figures = [self.rates_fig, self.latency_fig, self.conn_fig, self.herd_fig]
        for fig in self.figures:
            _legend(fig)

        self.status = pn.pane.Alert("reading the stats stream\u2026", alert_type="info", sizing_mode="stretch_width")
        self.filter_label = pn.pane.Markdown("**Channels:** all", margin=(5, 10))
        self.clear_filter = pn.widgets.Button(name="Show all channels", button_type="light", disabled=True)
        self.clear_filter.on_click(lambda _: self.set_pattern(None))
        default = next((k for k, v in WINDOWS.items() if v >= window), "15 min")
        self.window_choice = pn.widgets.RadioButtonGroup(name="window", options=list(WINDOWS), value=default)
        self.window_choice.param.watch(self._on_window, "value")

        sorters = [{"field": "published/s", "dir": "desc"}]
        self.channels_table = _table(CHANNEL_COLUMNS, 320, sortable=True, sorters=sorters, name="channels")
        self.channels_table.on_click(self._on_channel_click)
        self.replicas_table = _table(REPLICA_COLUMNS, 240, name="replicas")
        self.replicas_table.style.apply(_mark_stale, axis=1)
        self.transport_numbers = pn.pane.Markdown("", margin=(5, 10))

        self.herd_numbers = pn.Row(
            pn.indicators.Number(name="pokes pending", value=0, format="{value:.0f}", font_size="24pt"),
            pn.indicators.Number(name="poke spread (s)", value=0.0, format="{value:.1f}", font_size="24pt"),
            pn.indicators.Number(name="pulls/s", value=0.0, format="{value:.1f}", font_size="24pt"),
            pn.indicators.Number(name="coalesced/s", value=0.0, format="{value:.1f}", font_size="24pt"),
        )

        self.policy_table = _table(["pattern"], 200)
        self.policy_table.on_click(self._on_rule_click)
        self.policy_state = pn.pane.Markdown("", margin=(0, 10))
        self.policy_note = pn.pane.Alert("", alert_type="light", sizing_mode="stretch_width")
        self.policy_pattern = pn.widgets.TextInput(name="pattern", placeholder="sprint:*")
        self.policy_body = pn.widgets.TextAreaInput(
            name="its policy (JSON)", placeholder='{"window": 0.25, "poke_rate": 200, "poke_floor": 1}', height=90
        )
        self.policy_apply = pn.widgets.Button(name="Apply", button_type="primary")
        self.policy_apply.on_click(self._on_apply)
        controls_ok, message = self.admin.available()
        self.policy_note.object = message or (
            "Click a pattern to edit it, or name a new one. Every replica applies a change within a second."
        )
        self.policy_controls = pn.Row(self.policy_pattern, self.policy_body, self.policy_apply, visible=controls_ok)

    def panel(self) -> pn.viewable.Viewable:
        pane = dict(sizing_mode="stretch_width")

        def heading(text: str) -> pn.pane.Markdown:
            return pn.pane.Markdown(f"### {text}", margin=(0, 10))

        return pn.Column(
            pn.Row(pn.pane.Markdown("## sidecar: live traffic", margin=(0, 10)), pn.Spacer(), self.window_choice),
            self.status,
            pn.Row(self.filter_label, self.clear_filter),
            pn.pane.Bokeh(self.rates_fig, **pane),
            pn.Row(pn.pane.Bokeh(self.latency_fig, **pane), pn.pane.Bokeh(self.hist_fig, **pane), **pane),
            heading(f"Top channels (last {TOP_SECONDS} s; click a row to filter the plots)"),
            self.channels_table,
            pn.Row(
                pn.Column(heading("Connections"), self.transport_numbers, pn.pane.Bokeh(self.conn_fig, **pane), **pane),
                pn.Column(heading("Herd"), self.herd_numbers, pn.pane.Bokeh(self.herd_fig, **pane), **pane),
                **pane,
            ),
            heading("Replicas"),
            self.replicas_table,
            heading("Throttle policy"),
            self.policy_table,
            self.policy_state,
            self.policy_note,
            self.policy_controls,
            sizing_mode="stretch_width",
        )

    # -- updates --------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        now = self.clock()
        self._poll(now)
        window = self.feed.window
        settled = window.settled(now)
        if settled > self.end:
            start = max(self.end, settled - MAX_BINS)
            points = window.series(start, settled, self.pattern)
            for name, data in _columns(points).items():
                self.sources[name].stream(data, rollover=MAX_BINS)
            self.end = settled
            counts = window.histogram(settled, HISTOGRAM_SECONDS)
            self.histogram.patch({"count": [(slice(0, len(counts)), counts)]})
            self._update_numbers(points[-1])
        self._update_tables(now)
        self._update_policy(now)

    def _poll(self, now: float, force: bool = False) -> None:
        feed = self.feed
        if force or now - feed.attempted_at >= REFRESH_MS / 2000:
            feed.poll(now)

    def _reload(self) -> None:
        """Replace every series (first draw, or the channel filter changed)."""
        window: Window = self.feed.window
        oldest = window.oldest()  # no flat line for the time before any replica reported
        start = self.end if oldest is None else max(self.end - int(window.span), math.floor(oldest))
        points = window.series(start, self.end, self.pattern)
        for name, data in _columns(points).items():
            self.sources[name].data = data
        self.histogram.data = {"bucket": bucket_labels(), "count": window.histogram(self.end, HISTOGRAM_SECONDS)}
        if points:
            self._update_numbers(points[-1])

    def _update_numbers(self, last: Point) -> None:
        pending, spread, pulls, coalesced = self.herd_numbers.objects
        pending.value, spread.value = last.pending, last.spread
        pulls.value, coalesced.value = round(last.pulled, 1), round(last.coalesced, 1)

    def _update_tables(self, now: float) -> None:
        window = self.feed.window
        replicas = window.replicas(now)
        live = [r for r in replicas if not r.stale and not r.stopped]
        if self.feed.error:
            self.status.alert_type = "danger"
            self.status.object = f"Cannot read the stats stream `{self.config.stats_key}`: {self.feed.error}"
        elif not live:
            self.status.alert_type = "warning"
            self.status.object = "No sidecar is reporting" + (
                f" ({_gone(replicas)})" if replicas else f" (no record in `{self.config.stats_key}`)"
            )
        else:
            stale = sum(r.stale for r in replicas)
            self.status.alert_type = "success" if not stale else "warning"
            gone = _gone(replicas)
            self.status.object = f"{len(live)} sidecar replica{'s' if len(live) != 1 else ''} reporting" + (
                f", {gone}" if gone else ""
            )
        sse, ws = sum(r.sse for r in live), sum(r.ws for r in live)
        self.transport_numbers.object = f"**SSE** {sse} &nbsp; **WebSocket** {ws} &nbsp; **total** {sse + ws}"
        self.replicas_table.value = pd.DataFrame(
            [
                (r.replica, _status(r), r.sse, r.ws, r.connections,
                 r.subscribers, round(r.delivered, 1), "ok" if r.reader_ok else "DOWN", r.restarts, round(r.uptime))
                for r in replicas
            ],
            columns=REPLICA_COLUMNS,
        )  # fmt: skip
        rows = window.top_channels(self.end, TOP_SECONDS, now)[:100]
        self.channels_table.value = pd.DataFrame(
            [
                (c.pattern, round(c.published, 2), round(c.delivered, 2), c.subscribers, round(c.coalesced, 2),
                 round(c.dropped, 2), round(c.poke_delayed, 2), round(c.pulled, 2))
                for c in sorted(rows, key=lambda c: c.pattern)  # stable rows; the table sorts on screen
            ],
            columns=CHANNEL_COLUMNS,
        )  # fmt: skip

    def _update_policy(self, now: float, force: bool = False) -> None:
        if not force and now - self._policy_at < POLICY_EVERY:
            return
        self._policy_at = now
        try:
            self.policy = read_policy(self.feed.client, self.config.throttle_key)
        except Exception as exc:  # Redis down: the status line says so already
            self.policy_state.object = f"Cannot read `{self.config.throttle_key}`: {type(exc).__name__}"
            return
        rows = [{"pattern": r.pattern, **r.fields()} for r in self.policy.rules]
        self.policy_table.value = pd.DataFrame(rows) if rows else pd.DataFrame(columns=["pattern"])
        self.policy_state.object = self.policy.summary

    # -- interaction ----------------------------------------------------------------------------------------
    def set_pattern(self, pattern: str | None) -> None:
        self.pattern = pattern
        self.filter_label.object = f"**Channels:** `{pattern}`" if pattern else "**Channels:** all"
        self.clear_filter.disabled = pattern is None
        self.rates_fig.title.text = f"messages/s ({pattern})" if pattern else "messages/s (all channels)"
        self._reload()

    def _on_channel_click(self, event: Any) -> None:
        try:
            pattern = str(self.channels_table.value.iloc[event.row]["pattern"])
        except (IndexError, KeyError):
            return
        self.set_pattern(None if pattern == self.pattern else pattern)

    def _on_window(self, event: Any) -> None:
        self.x_range.follow_interval = WINDOWS[event.new] * 1000

    def _on_rule_click(self, event: Any) -> None:
        try:
            rule = self.policy.rules[event.row]
        except (IndexError, TypeError):
            return
        self.policy_pattern.value = rule.pattern
        self.policy_body.value = orjson.dumps(rule.policy).decode()

    def _on_apply(self, _: Any) -> None:
        pattern = self.policy_pattern.value.strip()
        try:
            policy = orjson.loads(self.policy_body.value or "{}")
        except orjson.JSONDecodeError as exc:
            self.policy_note.object = f"Not changed: the policy is not JSON ({exc})."
            return
        if not pattern or not isinstance(policy, dict):
            self.policy_note.object = 'Not changed: give a pattern and a JSON object like {"window": 0.25}.'
            return
        base = self.policy.doc if self.policy.doc is not None else self.admin.current()
        ok, message = self.admin.put(with_rule(base, pattern, policy))
        self.policy_note.object = message
        if not ok and message.startswith("Read-only"):
            self.policy_controls.visible = False
        self._update_policy(self.clock(), force=True)


def dashboard(config: DashboardConfig | None = None) -> pn.viewable.Viewable:
    """The dashboard as a Panel object, refreshing itself (in a served app or a notebook cell)."""
    pn.extension("tabulator", notifications=False)
    config = config or DashboardConfig.from_env()
    view = Dashboard(config, shared_feed(config))
    pn.state.add_periodic_callback(view.refresh, period=REFRESH_MS)
    return view.panel()


if __name__.startswith("bokeh_app") or __name__ == "__main__":
    dashboard().servable(title="sidecar dashboard")
