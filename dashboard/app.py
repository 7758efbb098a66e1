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

import functools
import io
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
from bokeh.models import (  # noqa: E402
    BasicTicker,
    ColorBar,
    ColumnDataSource,
    DataRange1d,
    DataTable,
    FactorRange,
    HoverTool,
    Label,
    LabelSet,
    LogColorMapper,
    NumeralTickFormatter,
    Range1d,
    Span,
    TableColumn,
)
from bokeh.palettes import Viridis256  # noqa: E402
from bokeh.plotting import figure  # noqa: E402

from sidecar.core.throttle import ChannelPolicy  # noqa: E402

from .feed import DashboardConfig, StatsFeed, redis_client  # noqa: E402
from .policy import (  # noqa: E402
    AdminAPI,
    PolicyView,
    channel_rows,
    in_force,
    limit_rows,
    policy_fields,
    rule_for,
    with_rule,
)
from .sources import LATENCY_BOUNDS_MS, N_BUCKETS, Point, ReplicaRow, Window, bucket_labels, heat_rows  # noqa: E402
from .whatif import channel_policy, compare  # noqa: E402

REFRESH_MS = 500
HISTOGRAM_SECONDS = 10
TOP_SECONDS = 10
WINDOWS = {"5 min": 300, "15 min": 900, "60 min": 3600}
POLICY_EVERY = 2.0  # seconds between reads of the throttle policy
REPLICA_COLUMNS = ["replica", "status", "front", "version", "SSE", "WS", "connections", "subscribers",
                   "delivered/s", "reader", "lag (ms)", "reconnects", "restarts", "uptime (s)"]  # fmt: skip
SHARD_COLUMNS = ["shard", "replicas", "lag (ms)", "worst replica", "reconnects", "last record (s ago)"]
SLOW_COLUMNS = ["replica", "transport", "channels", "queued bytes", "queued frames", "age (s)"]
CHANGE_COLUMNS = ["time (UTC)", "who", "what"]
SLOWEST = 10  # rows of the slowest-connections table
STAGES = {"ack": ("publish \u2192 Redis ack", "#8c564b"), "read": ("Redis \u2192 reader", "#1f77b4"),
          "held": ("held by the throttle", "#ff7f0e"), "queue": ("queue \u2192 socket", "#2ca02c"),
          "lat": ("end to end", "#d62728")}  # fmt: skip
CHANNEL_COLUMNS = ["pattern", "published/s", "delivered/s", "subscribers", "coalesced/s", "dropped/s",
                   "pokes delayed/s", "pulls/s", "p99 (ms)"]  # fmt: skip
WHATIF_COLUMNS = ["what", "in force", "proposed"]
NOTE_KINDS = {"ok": "success", "error": "danger", "read-only": "warning", "hint": "info"}


def shared_feed(config: DashboardConfig) -> StatsFeed:
    """One :class:`StatsFeed` per process and Redis, shared by every session."""

    def make() -> StatsFeed:
        client = redis_client(config, timeout=1.0)
        return StatsFeed(client, config.stats_key, span=max(config.window, max(WINDOWS.values())),
                         stale_after=config.stale_after, throttle_key=config.throttle_key,
                         log_key=config.log_key)  # fmt: skip

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
        "stages": {
            "t": list(t),
            **{
                f"{stage}_{q}": [_nan(p.stage_p(stage, n)) for p in points]
                for stage in STAGES
                for q, n in (("p50", 50), ("p99", 99))
            },
            "lag": [_nan(p.lag) for p in points],
        },  # fmt: skip
        "throttle": {
            "t": list(t),
            "ratio": [_nan(p.coalescing) for p in points],
            "messages_in": [p.coal_in for p in points],
            "frames_out": [p.coal_out for p in points],
            "held_p50": [_nan(p.stage_p("held", 50)) for p in points],
            "held_p99": [_nan(p.stage_p("held", 99)) for p in points],
            "spread_ms": [p.spread * 1000 for p in points],
            "dropped": [p.dropped for p in points],
            "resyncs": [p.slow for p in points],
        },
        "admission": {
            "t": list(t),
            "admitted": [p.admitted_conn for p in points],
            "deferred": [p.deferred for p in points],
            "rejected": [p.refused for p in points],
            "attempts": [p.attempts for p in points],
            "bucket": [p.bucket for p in points],
        },
        "queues": {
            "t": list(t),
            "p50": [_nan(p.depth_p(50)) for p in points],
            "p95": [_nan(p.depth_p(95)) for p in points],
            "p99": [_nan(p.depth_p(99)) for p in points],
            "stuck": [p.stuck for p in points],
        },
    }


def _heat(points: list[Point]) -> dict[str, list[Any]]:
    """The heatmap's cells for its source: x at the middle of the second, y the bucket's label."""
    cells = heat_rows(points)
    labels = bucket_labels()
    return {"t": [_ms(t) + 500 for t in cells["t"]], "bucket": [labels[i] for i in cells["bucket"]],
            "count": cells["count"]}  # fmt: skip


def _limit(name: str, color: str = "#d62728") -> Span:
    """A policy limit drawn on a chart, as a horizontal line (hidden while the limit is off)."""
    return Span(location=0, dimension="width", line_color=color, line_dash="dotted", line_width=2, name=f"limit-{name}",
                visible=False)  # fmt: skip


def _changes(changes: list[Any]) -> dict[str, list[Any]]:
    """The policy-change markers' source, oldest first."""
    ordered = list(reversed(changes))
    return {"t": [c.at * 1000 for c in ordered], "who": [c.who for c in ordered], "what": [c.what for c in ordered],
            "label": [f"{c.who}: {c.what}" for c in ordered],
            "when": [time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(c.at)) for c in ordered]}  # fmt: skip


def _figure(title: str, x_range: Range1d, y_label: str, height: int = 260, counts: bool = False) -> Any:
    fig = figure(
        title=title,
        x_axis_type="datetime",
        x_range=x_range,
        y_range=DataRange1d(start=0, default_span=1),  # a zero baseline keeps small wiggles small
        height=height,
        sizing_mode="stretch_width",
        tools="pan,xwheel_zoom,reset,save",
        toolbar_location="right",
    )
    fig.xaxis.axis_label = "time (UTC)"
    fig.yaxis.axis_label = y_label
    if counts:
        _integer_ticks(fig)
    return fig


def _integer_ticks(fig: Any) -> None:
    fig.yaxis.ticker = BasicTicker(min_interval=1)
    fig.yaxis.formatter = NumeralTickFormatter(format="0,0")


def _empty_label(fig: Any, name: str) -> Label:
    """The sentence a plot shows while it has nothing to plot (instead of an empty -1..1 axis)."""
    label = Label(name=f"empty-{name}", x=10, y=10, x_units="screen", y_units="screen", text="", text_color="#666666",
                  text_font_size="13px", background_fill_color="white", background_fill_alpha=0.8)  # fmt: skip
    fig.add_layout(label)
    return label


def _any(data: dict[str, list[Any]], columns: tuple[str, ...]) -> bool:
    return any(any(v and v == v for v in data[c]) for c in columns)  # v == v: not NaN


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
        **{"layout": "fit_data_stretch", "sizing_mode": "stretch_width", **options},
    )


def _legend(fig: Any) -> None:
    """Beside the plot, not on its data."""
    legend = fig.legend[0]
    legend.click_policy = "hide"
    legend.border_line_alpha = 0
    fig.add_layout(legend, "right")


def _held(callback: Callable[[Any], None]) -> Callable[[Any], None]:
    """A widget's callback with its changes made in a Panel hold. Panel runs a callback that comes while another
    change of the session is pending (Apply clicked while the edited text is still on its way) in a task of its
    own, outside the Bokeh document lock: a Bokeh model of ours changed there (a ColumnDataSource, a Span, a
    title) raised "_pending_writes should be non-None" and never reached the page. In a hold Panel sends those
    changes itself, as it does its widgets', together when the callback ends (with no document, as in a plain
    script, it does nothing). The periodic refresh needs none: Panel runs it under the lock."""

    @functools.wraps(callback)
    def run(event: Any) -> None:
        with pn.io.hold():
            callback(event)

    return run


def _csv(name: str, frame: Callable[[], pd.DataFrame]) -> pn.widgets.FileDownload:
    """A button that downloads what a table or plot shows, as CSV (made when clicked)."""

    def make() -> io.StringIO:
        return io.StringIO(frame().to_csv(index=False))

    return pn.widgets.FileDownload(callback=make, filename=f"{name}.csv", label=f"CSV: {name}",
                                   button_type="light", width=150, height=30, margin=(0, 10))  # fmt: skip


def _series_frame(source: ColumnDataSource) -> pd.DataFrame:
    frame = pd.DataFrame(dict(source.data))
    if "t" in frame:
        frame["t"] = pd.to_datetime(frame["t"], unit="ms", utc=True)
        frame = frame.rename(columns={"t": "time"})
    return frame


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
        self._change_ids: list[str] = []
        self.in_force, self.policy_source = config.defaults, "settings"
        self.range = next((v for v in WINDOWS.values() if v >= config.window), max(WINDOWS.values()))
        self._build()
        now = clock()
        self._poll(now, force=True)
        self.end = self.feed.window.settled(now)  # the first second not yet plotted
        self._reload()
        self._update_tables(now)
        self._update_policy(now, force=True)
        self._update_whatif()

    # -- layout ---------------------------------------------------------------------------------------------
    def _build(self) -> None:
        self.sources = {name: ColumnDataSource(data, name=name) for name, data in _columns([]).items()}
        self.histogram = ColumnDataSource(
            {"bucket": bucket_labels(), "count": [0.0] * len(LATENCY_BOUNDS_MS)}, name="histogram"
        )

        # One x range for every time series: they scroll together; live, it shows the chosen last minutes.
        self.x_range = Range1d(start=0, end=1, name="x_range")
        self.rates_fig = _figure("messages/s (all channels)", self.x_range, "messages/s")
        src = self.sources["rates"]
        self.rates_fig.line("t", "published", source=src, legend_label="published/s", line_width=2, color="#1f77b4")
        self.rates_fig.line(
            "t", "delivered", source=src, legend_label="delivered/s", line_width=2, color="#2ca02c", line_dash="dashed"
        )

        self.latency_fig = _figure("latency publish \u2192 socket (all channels)", self.x_range, "latency (ms)")
        src = self.sources["latency"]
        for q, color in (("p50", "#2ca02c"), ("p95", "#ff7f0e"), ("p99", "#d62728")):
            self.latency_fig.line("t", q, source=src, legend_label=q, line_width=2, color=color)
        # Without a write every latency is NaN, which gives the y range no bounds and the plot no axes: an
        # invisible point at 0..1 ms (in 1970, outside the x range) keeps the axes. It never changes the data shown.
        self.latency_fig.scatter([0, 0], [0, 1], alpha=0, name="latency-axis-floor")

        self.hist_fig = figure(
            title=f"latency histogram, last {HISTOGRAM_SECONDS} s",
            x_range=bucket_labels(),
            y_range=DataRange1d(start=0, default_span=1),
            height=260,
            sizing_mode="stretch_width",
            tools="save",
            toolbar_location=None,
        )
        self.hist_fig.vbar(x="bucket", top="count", source=self.histogram, width=0.8, color="#9467bd")
        self.hist_fig.scatter([bucket_labels()[0]], [1], alpha=0)  # an empty histogram keeps a 0..1 axis
        self.hist_fig.add_tools(HoverTool(tooltips=[("bucket", "@bucket ms"), ("writes", "@count{0}")]))
        self.hist_fig.xaxis.major_label_orientation = 0.8
        self.hist_fig.xaxis.axis_label = "latency bucket (ms)"
        self.hist_fig.yaxis.axis_label = "socket writes"
        _integer_ticks(self.hist_fig)

        self.conn_fig = _figure("connections by transport", self.x_range, "connections", height=220, counts=True)
        src = self.sources["connections"]
        self.conn_fig.line("t", "sse", source=src, legend_label="SSE", line_width=2, color="#1f77b4")
        self.conn_fig.line("t", "ws", source=src, legend_label="WebSocket", line_width=2, color="#ff7f0e")

        self.herd_fig = _figure("herd: pokes and pulls", self.x_range, "pokes, pulls/s", height=220)
        src = self.sources["herd"]
        self.herd_fig.line("t", "pending", source=src, legend_label="pokes pending", line_width=2, color="#d62728")
        self.herd_fig.line("t", "pulled", source=src, legend_label="pulls/s", line_width=2, color="#1f77b4")
        self.herd_fig.line("t", "poke_delayed", source=src, legend_label="pokes delayed/s", color="#8c564b")
        self.herd_fig.add_layout(limit := _limit("poke_rate"))
        self.limits = {"poke_rate": limit}
        self._build_v2()
        self.figures = [self.rates_fig, self.latency_fig, self.conn_fig, self.herd_fig, self.stage_fig,
                        self.ratio_fig, self.held_fig, self.drops_fig, self.adm_fig, self.queue_fig]  # fmt: skip
        for fig in self.figures:
            _legend(fig)
        # Policy changes: a vertical marker on every time chart, who and what written on two of them.
        self.changes = ColumnDataSource(_changes([]), name="changes")
        for fig in (*self.figures, self.heat_fig):
            marker = fig.vspan(x="t", source=self.changes, line_color="#7f7f7f", line_dash="dashed", line_width=2,
                               name="policy-marker")  # fmt: skip
            fig.add_tools(HoverTool(renderers=[marker], tooltips=[("who", "@who"), ("what", "@what"),
                                    ("when", "@when")], name="policy-hover"))  # fmt: skip
        for fig in (self.rates_fig, self.ratio_fig):
            fig.add_layout(LabelSet(x="t", y=5, y_units="screen", text="label", source=self.changes, x_offset=4,
                                    text_font_size="11px", text_color="#555555", name="policy-label"))  # fmt: skip
        demo = f"{self.config.sidecar_url}/demo"
        self.empty = {  # figure -> (its label, the source and columns it needs, what to say without them)
            "rates": (_empty_label(self.rates_fig, "rates"), "rates", ("published", "delivered"),
                      "Nothing published in this range: publish from a task, or open /demo and start a job"),
            "latency": (_empty_label(self.latency_fig, "latency"), "latency", ("p50",),
                        f"No frame written to a client in this range: open {demo} to see latency"),
            "connections": (_empty_label(self.conn_fig, "connections"), "connections", ("sse", "ws"),
                            f"No client connected: open {demo} to connect one"),
            "herd": (_empty_label(self.herd_fig, "herd"), "herd", ("pending", "pulled", "poke_delayed"),
                     "No pokes or pulls: poke_rate is 0, or no poke subscriber"),
            "stages": (_empty_label(self.stage_fig, "stages"), "stages", tuple(f"{s}_p99" for s in STAGES),
                       f"No stage latencies in this range: open {demo} to see them (replicas writing v1 "
                       "records do not split latency by stage)"),
            "throttle": (_empty_label(self.ratio_fig, "ratio"), "throttle", ("ratio",),
                         "Nothing offered to the throttle in this range: no subscriber of these channels"),
            "held": (_empty_label(self.held_fig, "held"), "throttle", ("held_p99",),
                     "No frame held: no coalescing window or poke spreading in this range"),
            "drops": (_empty_label(self.drops_fig, "drops"), "throttle", ("dropped", "resyncs"),
                      "No drops or resyncs in this range"),
            "admission": (_empty_label(self.adm_fig, "admission"), "admission", ("attempts", "bucket"),
                          "No connection attempt in this range (and no admission bucket: admit_rate is 0)"),
            "queues": (_empty_label(self.queue_fig, "queues"), "queues", ("p99", "stuck"),
                       f"No connection with a queue: open {demo} to connect one"),
        }  # fmt: skip
        self.hist_empty = _empty_label(self.hist_fig, "histogram")
        self.heat_empty = _empty_label(self.heat_fig, "heatmap")

        self.status = pn.pane.Alert("reading the stats stream\u2026", alert_type="info", sizing_mode="stretch_width")
        self.filter_label = pn.pane.Markdown("**Channels:** all", margin=(5, 10))
        self.clear_filter = pn.widgets.Button(name="Show all channels", button_type="light", disabled=True)
        self.clear_filter.on_click(_held(lambda _: self.set_pattern(None)))
        default = next(k for k, v in WINDOWS.items() if v == self.range)
        self.window_choice = pn.widgets.RadioButtonGroup(name="window", options=list(WINDOWS), value=default)
        self.window_choice.param.watch(_held(self._on_window), "value")
        self.pause = pn.widgets.Toggle(name="Pause", button_type="default", width=90)
        self.pause.param.watch(_held(self._on_pause), "value")

        sorters = [{"field": "published/s", "dir": "desc"}]
        self.channels_table = _table(CHANNEL_COLUMNS, 320, sortable=True, sorters=sorters, name="channels")
        self.channels_table.on_click(_held(self._on_channel_click))
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
        self.policy_table.on_click(_held(self._on_rule_click))
        self.limits_table = _table(["limit", "value"], 240)
        self.policy_state = pn.pane.Markdown("", margin=(0, 10))
        self.policy_note = pn.pane.Alert("", alert_type="info", sizing_mode="stretch_width")
        self.policy_pattern = pn.widgets.TextInput(name="pattern", placeholder="sprint:*")
        self.policy_body = pn.widgets.TextAreaInput(
            name="its policy (JSON)", placeholder='{"window": 0.25, "poke_rate": 200, "poke_floor": 1}', height=90
        )
        self.policy_apply = pn.widgets.Button(name="Apply", button_type="primary")
        self.policy_apply.on_click(_held(self._on_apply))
        for widget in (self.policy_pattern, self.policy_body):
            widget.param.watch(_held(lambda _: self._update_whatif()), "value")
        self.whatif_source = ColumnDataSource({c: [] for c in ("what", "now", "new")}, name="whatif")
        self.whatif_table = DataTable(
            source=self.whatif_source,
            columns=[TableColumn(field="what", title="over the recorded traffic", width=280),
                     TableColumn(field="now", title="policy in force"), TableColumn(field="new", title="proposed")],
            index_position=None, height=220, width=520, name="whatif_table", visible=False,
        )  # fmt: skip  # not drawn (it misses updates of its source); it keeps the source in the page for tests
        self.whatif_view = _table(WHATIF_COLUMNS, 260, name="whatif", width=560, height=260, sizing_mode="fixed")
        self.whatif_note = pn.pane.Markdown("", margin=(0, 10), width=520)
        controls_ok, message = self.admin.available()
        self._note(
            message or "Click a pattern to edit it, or name a new one. Every replica applies a change within a second.",
            "read-only" if message else "hint",
        )
        self.policy_controls = pn.Row(
            pn.Column(self.policy_pattern, self.policy_body, self.policy_apply),
            pn.Column(self.whatif_note, self.whatif_view, pn.pane.Bokeh(self.whatif_table)),
            visible=controls_ok,
        )

    def _build_v2(self) -> None:
        """The charts and tables of record v2: stages, the heatmap, the throttle, admission, queues, the fleet."""
        self.heatmap = ColumnDataSource({"t": [], "bucket": [], "count": []}, name="heatmap")
        for name, data in _columns([]).items():
            self.sources.setdefault(name, ColumnDataSource(data, name=name))
        src = self.sources["stages"]
        self.stage_fig = _figure("where the time goes: p99 by stage (all channels)", self.x_range, "latency (ms)")
        for stage, (label, color) in STAGES.items():
            dash = "dashed" if stage == "lat" else "solid"
            self.stage_fig.line("t", f"{stage}_p99", source=src, legend_label=label, line_width=2, color=color,
                                line_dash=dash)  # fmt: skip
        self.stage_fig.line("t", "lag", source=src, legend_label="reader lag, worst shard", color="#7f7f7f",
                            line_dash="dotted", line_width=2)  # fmt: skip
        self.stage_fig.scatter([0, 0], [0, 1], alpha=0)  # the axes without data (see latency_fig)

        self.heat_fig = figure(
            title="latency heatmap (socket writes per second and bucket)",
            x_axis_type="datetime",
            x_range=self.x_range,
            y_range=FactorRange(*bucket_labels()),
            height=260,
            sizing_mode="stretch_width",
            tools="pan,xwheel_zoom,reset,save",
            toolbar_location="right",
        )
        mapper = LogColorMapper(palette=Viridis256, low=1, high=1000, low_color="#f4f4f4")
        self.heat_fig.rect(x="t", y="bucket", width=1000, height=1, source=self.heatmap, line_color=None,
                           fill_color={"field": "count", "transform": mapper})  # fmt: skip
        self.heat_fig.add_layout(ColorBar(color_mapper=mapper, title="writes", width=10), "right")
        self.heat_fig.add_tools(HoverTool(tooltips=[("bucket", "@bucket ms"), ("writes", "@count{0.0}")]))
        self.heat_fig.xaxis.axis_label = "time (UTC)"
        self.heat_fig.yaxis.axis_label = "latency bucket (ms)"

        src = self.sources["throttle"]
        self.ratio_fig = _figure("coalescing: messages in / frames out", self.x_range, "ratio (1: none coalesced)")
        self.ratio_fig.line("t", "ratio", source=src, legend_label="in / out", line_width=2, color="#9467bd")
        self.held_fig = _figure("time held by windows and poke spreading", self.x_range, "ms")
        self.held_fig.line("t", "held_p50", source=src, legend_label="held p50", line_width=2, color="#ff7f0e")
        self.held_fig.line("t", "held_p99", source=src, legend_label="held p99", line_width=2, color="#d62728")
        self.held_fig.line("t", "spread_ms", source=src, legend_label="poke spread", color="#8c564b",
                           line_dash="dashed")  # fmt: skip
        self.held_fig.scatter([0, 0], [0, 1], alpha=0)
        self.drops_fig = _figure("slow-consumer drops and resyncs", self.x_range, "per second")
        self.drops_fig.line("t", "dropped", source=src, legend_label="frames dropped/s", line_width=2, color="#d62728")
        self.drops_fig.line("t", "resyncs", source=src, legend_label="resync drops/s (all channels)", color="#7f7f7f")

        src = self.sources["admission"]
        self.adm_fig = _figure("admission (every replica)", self.x_range, "connections/s, tokens")
        for column, label, color in (
            ("admitted", "admitted/s", "#2ca02c"),
            ("deferred", "deferred/s", "#ff7f0e"),
            ("rejected", "rejected/s", "#d62728"),
            ("bucket", "bucket level", "#1f77b4"),
        ):
            dash = "dashed" if column == "bucket" else "solid"
            self.adm_fig.line("t", column, source=src, legend_label=label, line_width=2, color=color, line_dash=dash)

        src = self.sources["queues"]
        self.queue_fig = _figure("queued frames per connection", self.x_range, "frames")
        for q, color in (("p50", "#2ca02c"), ("p95", "#ff7f0e"), ("p99", "#d62728")):
            self.queue_fig.line("t", q, source=src, legend_label=q, line_width=2, color=color)
        self.queue_fig.line("t", "stuck", source=src, legend_label="stuck closes/s", color="#7f7f7f",
                            line_dash="dashed")  # fmt: skip
        self.queue_fig.scatter([0, 0], [0, 1], alpha=0)
        for name, fig in (("window", self.held_fig), ("admit_rate", self.adm_fig), ("queue_frames", self.queue_fig)):
            fig.add_layout(span := _limit(name))
            self.limits[name] = span
        self.limits_note = pn.pane.Markdown("", margin=(0, 10))

        self.shards_table = _table(SHARD_COLUMNS, 240, name="shards")
        self.slow_table = _table(SLOW_COLUMNS, 300, name="slowest")
        self.slow_note = pn.pane.Markdown("", margin=(0, 10))
        self.changes_table = _table(CHANGE_COLUMNS, 240, name="changes")
        self.publishers_note = pn.pane.Markdown("", margin=(0, 10))

    def panel(self) -> pn.viewable.Viewable:
        pane = dict(sizing_mode="stretch_width")

        def heading(text: str) -> pn.pane.Markdown:
            return pn.pane.Markdown(f"### {text}", margin=(0, 10))

        def series(name: str) -> pn.widgets.FileDownload:
            return _csv(name, lambda: _series_frame(self.sources[name]))

        def table(name: str, widget: pn.widgets.Tabulator) -> pn.widgets.FileDownload:
            return _csv(name, lambda: widget.value)

        histogram = _csv("latency-histogram", lambda: pd.DataFrame(dict(self.histogram.data)))
        whatif = _csv("whatif", lambda: self.whatif_view.value)
        return pn.Column(
            pn.Row(
                pn.pane.Markdown("## sidecar: live traffic", margin=(0, 10)),
                pn.Spacer(),
                self.window_choice,
                self.pause,
            ),  # fmt: skip
            self.status,
            pn.Row(self.filter_label, self.clear_filter),
            pn.pane.Bokeh(self.rates_fig, **pane),
            series("rates"),
            pn.Row(
                pn.Column(pn.pane.Bokeh(self.latency_fig, **pane), series("latency"), **pane),
                pn.Column(pn.pane.Bokeh(self.hist_fig, **pane), histogram, **pane),
                **pane,
            ),
            heading("Where the time goes"),
            self.publishers_note,
            pn.Row(
                pn.Column(pn.pane.Bokeh(self.stage_fig, **pane), series("stages"), **pane),
                pn.Column(
                    pn.pane.Bokeh(self.heat_fig, **pane),
                    _csv("latency-heatmap", lambda: _series_frame(self.heatmap)),
                    **pane,
                ),
                **pane,
            ),  # fmt: skip
            heading("What the throttle did (the channel filter chooses the pattern; dotted: the policy's limits)"),
            self.limits_note,
            pn.Row(pn.pane.Bokeh(self.ratio_fig, **pane), pn.pane.Bokeh(self.held_fig, **pane), **pane),
            pn.Row(pn.pane.Bokeh(self.drops_fig, **pane), pn.pane.Bokeh(self.adm_fig, **pane), **pane),
            pn.Row(series("throttle"), series("admission")),
            heading("Connections that struggle"),
            pn.Row(
                pn.Column(pn.pane.Bokeh(self.queue_fig, **pane), series("queues"), **pane),
                pn.Column(
                    self.slow_note,
                    self.slow_table,
                    table("slowest", self.slow_table),
                    **pane,
                ),
                **pane,
            ),  # fmt: skip
            heading(f"Top channels (last {TOP_SECONDS} s; click a row to filter the plots)"),
            self.channels_table,
            table("channels", self.channels_table),
            pn.Row(
                pn.Column(
                    heading("Connections"),
                    self.transport_numbers,
                    pn.pane.Bokeh(self.conn_fig, **pane),
                    series("connections"),
                    **pane,
                ),  # fmt: skip
                pn.Column(
                    heading("Herd"), self.herd_numbers, pn.pane.Bokeh(self.herd_fig, **pane), series("herd"), **pane
                ),  # fmt: skip
                **pane,
            ),
            heading("Replicas"),
            self.replicas_table,
            table("replicas", self.replicas_table),
            heading("Redis shards"),
            self.shards_table,
            table("shards", self.shards_table),
            heading("Throttle policy"),
            self.policy_state,
            pn.pane.Markdown("**Changes** (newest first; dashed lines on the charts)", margin=(0, 10)),
            self.changes_table,
            table("policy-changes", self.changes_table),
            pn.Row(
                pn.Column(self.policy_table, table("policy", self.policy_table), **pane),
                pn.Column(self.limits_table, table("limits", self.limits_table), width=320),
                **pane,
            ),
            self.policy_note,
            self.policy_controls,
            whatif,
            sizing_mode="stretch_width",
        )

    # -- updates --------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        now = self.clock()
        self._poll(now)
        if self.pause.value:  # frozen for a look (pan, zoom, export); the feed still reads for the others
            return
        window = self.feed.window
        settled = window.settled(now)
        if settled > self.end:
            start = max(self.end, settled - self.range)
            points = window.series(start, settled, self.pattern)
            for name, data in _columns(points).items():
                self.sources[name].stream(data, rollover=self.range)
            self.heatmap.stream(_heat(points), rollover=self.range * N_BUCKETS)
            self.end = settled
            counts = window.histogram(settled, HISTOGRAM_SECONDS)
            self.histogram.patch({"count": [(slice(0, len(counts)), counts)]})
            self._update_numbers(points[-1])
            self._follow()
        self._update_tables(now)
        self._update_policy(now)

    def _follow(self) -> None:
        """The x range: the chosen minutes up to the last settled second; the empty-plot sentences."""
        self.x_range.update(start=_ms(self.end - self.range), end=_ms(self.end))
        for label, source, columns, text in self.empty.values():
            label.text = "" if _any(self.sources[source].data, columns) else text
            label.visible = bool(label.text)
        writes = any(self.histogram.data["count"])
        self.hist_empty.text = "" if writes else f"No socket write in the last {HISTOGRAM_SECONDS} s"
        self.hist_empty.visible = not writes
        cells = bool(self.heatmap.data["count"])
        self.heat_empty.text = "" if cells else "No socket write in this range: nothing to place in latency buckets"
        self.heat_empty.visible = not cells

    def _poll(self, now: float, force: bool = False) -> None:
        feed = self.feed
        if force or now - feed.attempted_at >= REFRESH_MS / 2000:
            feed.poll(now)

    def _reload(self) -> None:
        """Replace every series (first draw, the channel filter or the time range changed, or a resume)."""
        window: Window = self.feed.window
        oldest = window.oldest()  # no flat line for the time before any replica reported
        start = self.end - self.range if oldest is None else max(self.end - self.range, math.floor(oldest))
        points = window.series(start, self.end, self.pattern)
        for name, data in _columns(points).items():
            self.sources[name].data = data
        self.heatmap.data = _heat(points)
        self.histogram.data = {"bucket": bucket_labels(), "count": window.histogram(self.end, HISTOGRAM_SECONDS)}
        if points:
            self._update_numbers(points[-1])
        self._follow()

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
                (r.replica, _status(r), r.front or "?", r.version or "?", r.sse, r.ws, r.connections,
                 r.subscribers, round(r.delivered, 1), "ok" if r.reader_ok else "DOWN",
                 "" if r.lag_ms is None else round(r.lag_ms, 1), r.reconnects, r.restarts, round(r.uptime))
                for r in replicas
            ],
            columns=REPLICA_COLUMNS,
        )  # fmt: skip
        self._update_fleet(now)
        rows = window.top_channels(self.end, TOP_SECONDS, now)[:100]
        self.channels_table.value = pd.DataFrame(
            [
                (c.pattern, round(c.published, 2), round(c.delivered, 2), c.subscribers, round(c.coalesced, 2),
                 round(c.dropped, 2), round(c.poke_delayed, 2), round(c.pulled, 2),
                 "" if c.p99 is None else round(c.p99, 1))
                for c in sorted(rows, key=lambda c: c.pattern)  # stable rows; the table sorts on screen
            ],
            columns=CHANNEL_COLUMNS,
        )  # fmt: skip

    def _update_fleet(self, now: float) -> None:
        """The shard, slowest-connection and publisher views (v2 records; empty with v1 ones)."""
        window = self.feed.window
        self.shards_table.value = pd.DataFrame(
            [(s.shard, s.replicas, "" if s.lag_ms is None else round(s.lag_ms, 1), s.worst, s.reconnects,
              round(s.age, 1) if math.isfinite(s.age) else "") for s in window.shards(now)],
            columns=SHARD_COLUMNS,
        )  # fmt: skip
        slowest = window.slowest(now, SLOWEST)
        self.slow_table.value = pd.DataFrame(
            [(r.replica, r.transport, r.channels, r.queued_bytes, r.queued_frames, round(r.age, 1)) for r in slowest],
            columns=SLOW_COLUMNS,
        )
        self.slow_note.object = (
            f"**Slowest {SLOWEST} connections** (most queued bytes, live replicas)"
            if slowest
            else "**Slowest connections**: none has bytes queued now (nobody is behind)."
        )
        pubs = window.publishers(now)
        self.publishers_note.object = (
            f"Publish \u2192 Redis ack from {len(pubs)} publisher process{'es' if len(pubs) != 1 else ''} "
            f"({sum(n for _, _, n in pubs)} publishes in the window); each stage's p99 below, every replica summed."
            if pubs else "No publisher record in the window (publishers write one only when they publish): the "
            "publish \u2192 Redis ack line stays empty."
        )  # fmt: skip

    def _update_limits(self) -> None:
        """The policy's limits on the charts: the filtered pattern's rule (or ``*``'s) and the replica-wide ones,
        summed over the live replicas where the chart sums them (the admission rate)."""
        pattern = self.pattern or "*"
        rule = rule_for(self.in_force, pattern)
        replicas = max(len(self.feed.window.live(self.clock())), 1)
        values = {
            "window": rule.window * 1000,
            "poke_rate": rule.poke_rate,
            "admit_rate": self.in_force.admit_rate * replicas,
            "queue_frames": self.in_force.queue_frames,
        }
        for name, span in self.limits.items():
            span.location = values[name]
            span.visible = values[name] > 0
        self.limits_note.object = (
            f"Limits of `{pattern}`: window {rule.window:g} s, poke rate {rule.poke_rate:g} pulls/s (floor "
            f"{rule.poke_floor:g} s); every replica: admit_rate {self.in_force.admit_rate:g}/s, queue_frames "
            f"{self.in_force.queue_frames} ({self.policy_source})."
        )  # fmt: skip

    def _update_changes(self) -> None:
        changes = self.feed.changes
        if [c.id for c in changes] == self._change_ids:
            return
        self._change_ids = [c.id for c in changes]
        self.changes.data = _changes(changes)
        self.changes_table.value = pd.DataFrame(
            [(time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(c.at)), c.who, c.what) for c in changes],
            columns=CHANGE_COLUMNS,
        )

    def _update_policy(self, now: float, force: bool = False) -> None:
        if not force and now - self._policy_at < POLICY_EVERY:
            return
        self._policy_at = now
        self.feed.poll_meta(now, force=force)
        self._update_changes()
        if self.feed.meta_error:
            self.policy_state.object = f"Cannot read `{self.config.throttle_key}`: {self.feed.meta_error}"
            return
        view = self.feed.policy
        changed = view != self.policy
        self.policy = view
        self.in_force, self.policy_source = in_force(view, self.config.defaults)
        self._update_limits()
        if changed or force:
            self.policy_table.value = pd.DataFrame(channel_rows(self.in_force, self.policy_source))
            limits = [{"limit": r["limit"], "value": f"{r['value']:g}"} for r in limit_rows(self.in_force)]
            self.limits_table.value = pd.DataFrame(limits)  # as text: 1000 frames, not 1,000.0
        if view.doc is None:
            self.policy_state.object = ("No policy set by ops: every replica runs its settings' policy "
                                        "(SIDECAR_COALESCE_WINDOW, SIDECAR_POKE_RATE, ...), shown here.")  # fmt: skip
        else:
            at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(view.updated)) if view.updated else "?"
            self.policy_state.object = f"Policy version {view.version}, set by ops at {at}."

    def _note(self, text: str, kind: str) -> None:
        """The editor's message: green when it worked, red when it did not, amber when read-only."""
        self.policy_note.alert_type = NOTE_KINDS[kind]
        self.policy_note.object = text

    def _proposed(self) -> tuple[str, ChannelPolicy] | str:
        """The edited pattern and its rule, or what is wrong with them."""
        pattern = self.policy_pattern.value.strip()
        try:
            policy = orjson.loads(self.policy_body.value or "{}")
        except orjson.JSONDecodeError as exc:
            return f"the policy is not JSON ({exc})"
        if not pattern or not isinstance(policy, dict):
            return 'give a pattern and a JSON object like {"window": 0.25}'
        try:
            return pattern, channel_policy(policy)
        except ValueError as exc:
            return str(exc)

    def _show_whatif(self, rows: list[tuple[str, str, str]]) -> None:
        self.whatif_source.data = {"what": [r[0] for r in rows], "now": [r[1] for r in rows],
                                   "new": [r[2] for r in rows]}  # fmt: skip
        self.whatif_view.value = pd.DataFrame(rows, columns=WHATIF_COLUMNS)

    def _update_whatif(self) -> None:
        """The edited rule against the one in force, replayed over the chosen minutes of the pattern's traffic."""
        proposed = self._proposed()
        if not self.policy_pattern.value.strip():
            self.whatif_note.object = "Name a pattern and its policy to see what it would have done."
            self._show_whatif([])
            return
        if isinstance(proposed, str):
            self.whatif_note.object = f"No what-if: {proposed}."
            self._show_whatif([])
            return
        pattern, rule = proposed
        window = self.feed.window
        labels = window.labels_under(pattern)
        oldest = window.oldest()
        start = self.end - self.range if oldest is None else max(self.end - self.range, math.floor(oldest))
        if not labels or start >= self.end:
            self.whatif_note.object = (f"No what-if: no traffic recorded under `{pattern}` in the last "
                                       f"{self.range // 60} min (channels no configured pattern matches count as "
                                       "`*`; SIDECAR_STATS_PATTERNS names more).")  # fmt: skip
            self._show_whatif([])
            return
        points = window.series(start, self.end, labels)
        rows = compare(points, rule_for(self.in_force, pattern), rule)
        self.whatif_source.tags = [
            {"start": start, "end": self.end, "labels": sorted(labels), "pattern": pattern, "rule": policy_fields(rule)}
        ]
        self._show_whatif(rows)
        span = f"{time.strftime('%H:%M:%S', time.gmtime(start))}-{time.strftime('%H:%M:%S UTC', time.gmtime(self.end))}"
        self.whatif_note.object = (f"**What-if** over {span} ({len(points)} s) of "
                                   f"{', '.join(f'`{n}`' for n in sorted(labels))}: the relay's throttle replayed "
                                   "on the recorded counts, as if on one channel (docs/dashboard.md).")  # fmt: skip

    # -- interaction ----------------------------------------------------------------------------------------
    def set_pattern(self, pattern: str | None) -> None:
        self.pattern = pattern
        self.filter_label.object = f"**Channels:** `{pattern}`" if pattern else "**Channels:** all"
        self.clear_filter.disabled = pattern is None
        self.rates_fig.title.text = f"messages/s ({pattern})" if pattern else "messages/s (all channels)"
        self.ratio_fig.title.text = f"coalescing: messages in / frames out ({pattern or 'all channels'})"
        self._update_limits()
        self._reload()

    def _on_channel_click(self, event: Any) -> None:
        try:
            pattern = str(self.channels_table.value.iloc[event.row]["pattern"])
        except (IndexError, KeyError):
            return
        self.set_pattern(None if pattern == self.pattern else pattern)

    def _on_window(self, event: Any) -> None:
        self.range = WINDOWS[event.new]
        self._reload()
        self._update_whatif()

    def _on_pause(self, event: Any) -> None:
        self.pause.name = "Resume" if event.new else "Pause"
        self.pause.button_type = "warning" if event.new else "default"
        if not event.new:  # back to live: what settled meanwhile, in one go
            self.end = self.feed.window.settled(self.clock())
            self._reload()

    def _on_rule_click(self, event: Any) -> None:
        try:
            row = self.policy_table.value.iloc[event.row]
        except (IndexError, TypeError, AttributeError):
            return
        pattern = str(row["pattern"])
        rule = self.in_force.channels.get(pattern)
        self.policy_pattern.value = pattern
        self.policy_body.value = orjson.dumps(policy_fields(rule) if rule else {}).decode()

    def _on_apply(self, _: Any) -> None:
        proposed = self._proposed()
        if isinstance(proposed, str):
            self._note(f"Not changed: {proposed}.", "error")
            return
        pattern, _rule = proposed
        policy = orjson.loads(self.policy_body.value or "{}")
        base = self.policy.doc if self.policy.doc is not None else self.admin.current()
        ok, message = self.admin.put(with_rule(base, pattern, policy))
        self._note(message, "ok" if ok else "read-only" if message.startswith("Read-only") else "error")
        if not ok and message.startswith("Read-only"):
            self.policy_controls.visible = False
        self._update_policy(self.clock(), force=True)
        self._update_whatif()


def dashboard(config: DashboardConfig | None = None) -> pn.viewable.Viewable:
    """The dashboard as a Panel object, refreshing itself (in a served app or a notebook cell)."""
    pn.extension("tabulator", notifications=False)
    config = config or DashboardConfig.from_env()
    view = Dashboard(config, shared_feed(config))
    pn.state.add_periodic_callback(view.refresh, period=REFRESH_MS)
    return view.panel()


if __name__.startswith("bokeh_app") or __name__ == "__main__":
    dashboard().servable(title="sidecar dashboard")
