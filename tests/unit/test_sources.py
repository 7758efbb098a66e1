"""The dashboard's aggregation: stats records -> what the plots and tables show. Pure: records made by hand."""

from __future__ import annotations

import math

import orjson
import pytest

from dashboard.policy import changes_frame, parse_change, view_of, with_rule
from dashboard.sources import (
    N_BUCKETS,
    Record,
    Window,
    bucket_labels,
    heat_rows,
    parse_record,
    percentile,
    percentile_by,
    records_frame,
    stages_frame,
)
from sidecar.stats import LATENCY_BOUNDS_MS

T0 = 1_800_000_000


def lat(**buckets: int) -> tuple[int, ...]:
    """A histogram with counts in the buckets named by their bound, e.g. lat(b2=10, b5=3)."""
    counts = [0] * N_BUCKETS
    for name, n in buckets.items():
        bound = float(name[1:].replace("_", "."))
        counts[LATENCY_BOUNDS_MS.index(bound)] = n
    return tuple(counts)


_seq = iter(range(1, 1_000_000))


def rec(replica: str, ts: float, dt: float = 1.0, started: float = T0 - 100, **kw: object) -> Record:
    return Record(id=f"{int(ts * 1000)}-{next(_seq)}", replica=replica, ts=ts, dt=dt, started=started, **kw)


def ch(**patterns: dict[str, int]) -> dict[str, dict[str, int]]:
    return {p.replace("_", ":"): entry for p, entry in patterns.items()}


# -- percentiles --------------------------------------------------------------------------------------------
def test_percentile_of_an_empty_histogram_is_none():
    assert percentile([0] * N_BUCKETS, 50) is None


def test_percentile_interpolates_inside_its_bucket():
    counts = lat(b1=50, b2=50)  # 50 in (0.5, 1], 50 in (1, 2]
    assert percentile(counts, 50) == pytest.approx(1.0)
    assert percentile(counts, 75) == pytest.approx(1.5)
    assert percentile(counts, 100) == pytest.approx(2.0)
    assert percentile(lat(b0_5=10), 50) == pytest.approx(0.25)  # the first bucket starts at 0


def test_percentiles_order_and_tail():
    counts = lat(b2=90, b50=9, b1000=1)
    p50, p95, p99 = (percentile(counts, q) for q in (50, 95, 99))
    assert p50 is not None and p95 is not None and p99 is not None
    assert 1 < p50 <= 2 < p95 < 50
    assert p99 == pytest.approx(50)  # the 99th of 100 is the last one in (20, 50]
    assert percentile(counts, 99.5) == pytest.approx(750.0)  # halfway into (500, 1000]


def test_percentile_in_the_open_last_bucket_is_its_lower_bound():
    counts = [0] * N_BUCKETS
    counts[-1] = 5
    assert percentile(counts, 99) == 5000
    assert bucket_labels()[-1] == ">5000" and len(bucket_labels()) == N_BUCKETS


# -- parsing ------------------------------------------------------------------------------------------------
def test_parse_record_reads_the_schema_and_tolerates_missing_fields():
    doc = {
        "v": 1, "replica": "web-1:42", "host": "web-1", "pid": 42, "port": 8000, "ts": T0 + 0.5, "dt": 1.0,
        "started": T0 - 10, "reader": 1, "conn": {"sse": 2, "ws": 1}, "slow": 3, "lat": [0, 4, 1],
        "herd": {"pending": 7, "spread": 2.5}, "ch": {"task:*": {"pub": 5, "dlv": 10, "subs": 2}},
    }  # fmt: skip
    r = parse_record(b"1-0", {b"r": orjson.dumps(doc)})
    assert r is not None
    assert (r.id, r.replica, r.conn, r.slow, r.pending, r.spread) == ("1-0", "web-1:42", {"sse": 2, "ws": 1}, 3, 7, 2.5)
    assert r.lat[:3] == (0, 4, 1) and len(r.lat) == N_BUCKETS
    assert r.counts("task:*")["dlv"] == 10 and r.counts()["subs"] == 2
    assert parse_record("2-0", {"r": orjson.dumps({"v": 1, "replica": "x", "ts": T0, "dt": 1})}) is not None


@pytest.mark.parametrize(
    "raw", [b"not json", orjson.dumps({"v": 3, "replica": "x", "ts": 1, "dt": 1}), orjson.dumps({"v": 1}),
            orjson.dumps({"v": 1, "replica": "x", "ts": 1, "dt": 0}), orjson.dumps([1, 2])],
)  # fmt: skip
def test_parse_record_skips_what_it_cannot_read(raw):
    assert parse_record("1-0", {b"r": raw}) is None


# -- aggregation across replicas ----------------------------------------------------------------------------
def two_replicas() -> Window:
    w = Window(span=600, stale_after=5)
    for i in range(1, 6):
        t = T0 + i
        w.add([
            rec("a", t, conn={"sse": 2}, lat=lat(b1=4), channels=ch(orders_x={"pub": 10, "dlv": 20, "subs": 2})),
            rec("b", t, conn={"ws": 3}, lat=lat(b10=1), channels=ch(orders_x={"pub": 10, "dlv": 30, "subs": 3},
                                                                    task_x={"dlv": 1, "coal": 4, "subs": 1})),
        ])  # fmt: skip
    return w


def test_published_is_one_replicas_count_and_delivered_the_sum():
    # Every replica reads every message, so two replicas reading 10/s means 10 published/s, not 20.
    points = two_replicas().series(T0 + 1, T0 + 5)
    assert [p.published for p in points] == pytest.approx([10] * 4)
    assert [p.delivered for p in points] == pytest.approx([51] * 4)
    assert [p.coalesced for p in points] == pytest.approx([4] * 4)
    assert [(p.sse, p.ws, p.subscribers, p.replicas) for p in points] == [(2, 3, 6, 2)] * 4
    assert points[0].latency[LATENCY_BOUNDS_MS.index(1)] == pytest.approx(4)
    assert points[0].p50 is not None and 0.5 < points[0].p50 <= 1 and points[0].p99 > 5


def test_published_adds_up_when_replicas_sample_out_of_phase():
    # A burst of 60 messages at T0+2.2 (read by both), seen through records that tick at .5 and at .9.
    w = Window(stale_after=5)
    w.add([rec("a", T0 + i + 0.5, channels=ch(c_x={"pub": 60 if i == 2 else 0})) for i in range(6)])
    w.add([rec("b", T0 + i + 0.9, channels=ch(c_x={"pub": 60 if i == 2 else 0})) for i in range(6)])
    points = w.series(T0, T0 + 6)
    assert sum(p.published for p in points) == pytest.approx(60)  # a per-second max would say 84
    assert max(p.published for p in points) <= 60


def test_published_adds_up_when_a_replica_starts_during_a_burst():
    w = Window(stale_after=5)
    w.add([rec("a", T0 + 0.5, dt=0.4, started=T0 + 0.1, channels=ch(c_x={"pub": 50})),
           rec("a", T0 + 1.1, dt=0.6, started=T0 + 0.1, channels=ch(c_x={"pub": 10}))])  # fmt: skip
    w.add([rec("b", T0 + 1.2, dt=0.9, started=T0 + 0.3, channels=ch(c_x={"pub": 60}))])
    assert sum(p.published for p in w.series(T0, T0 + 2)) == pytest.approx(60)


def test_when_the_oldest_replica_stops_another_one_counts_published():
    w = Window(stale_after=5)
    w.add([rec("old", T0 + 0.5 + i, started=T0 - 50, channels=ch(c_x={"pub": 10})) for i in range(3)])  # to 2.5
    w.add([rec("new", T0 + 0.8 + i, started=T0 - 10, channels=ch(c_x={"pub": 10})) for i in range(6)])
    assert [p.published for p in w.series(T0, T0 + 5)] == pytest.approx([10] * 5)


def test_a_replica_whose_reader_is_down_does_not_drag_published_down():
    w = Window(stale_after=5)
    w.add([rec("a", T0 + i, channels=ch(c_x={"pub": 10})) for i in range(1, 4)])
    w.add([rec("b", T0 + i, reader_ok=False, channels=ch(c_x={"subs": 1})) for i in range(1, 4)])
    assert [p.published for p in w.series(T0 + 1, T0 + 3)] == pytest.approx([10, 10])
    assert w.top_channels(T0 + 3, 2, T0 + 3)[0].published == pytest.approx(10)


def test_a_pattern_filter_shows_only_that_pattern():
    points = two_replicas().series(T0 + 1, T0 + 5, "task:x")
    assert [(p.published, p.delivered, p.subscribers) for p in points] == [(0, 1, 1)] * 4


def test_counts_are_spread_over_the_seconds_their_record_covers():
    w = Window(stale_after=5)
    # Ticks half a second off the bin edges, and one record covering 3 s (two writes failed meanwhile).
    w.add([rec("a", T0 + 1.5, channels=ch(c_x={"pub": 10, "dlv": 20}))])
    w.add([rec("a", T0 + 4.5, dt=3.0, channels=ch(c_x={"pub": 30, "dlv": 60}))])
    w.add([rec("a", T0 + 5.5, channels=ch(c_x={"pub": 10, "dlv": 20}))])
    points = w.series(T0 + 1, T0 + 5)
    assert [p.published for p in points] == pytest.approx([10, 10, 10, 10])
    assert [p.delivered for p in points] == pytest.approx([20, 20, 20, 20])
    everything = w.series(T0, T0 + 6)
    assert sum(p.published for p in everything) == pytest.approx(50)  # nothing lost, nothing doubled
    assert sum(p.delivered for p in everything) == pytest.approx(100)


def test_top_channels_are_rates_over_the_window_busiest_first():
    rows = two_replicas().top_channels(T0 + 5, seconds=4, now=T0 + 5)
    assert [r.pattern for r in rows] == ["orders:x", "task:x"]
    orders, task = rows
    assert (orders.published, orders.delivered, orders.subscribers) == pytest.approx((10, 50, 5))
    assert (task.published, task.delivered, task.coalesced, task.subscribers) == pytest.approx((0, 1, 4, 1))


# -- stale replicas -----------------------------------------------------------------------------------------
def test_a_replica_that_stops_reporting_is_marked_stale_and_not_waited_for():
    w = two_replicas()
    w.add([rec("a", T0 + 6 + i, conn={"sse": 2}, channels=ch(orders_x={"pub": 10})) for i in range(6)])  # b died
    now = T0 + 11.2
    rows = {r.replica: r for r in w.replicas(now)}
    assert rows["b"].stale and not rows["a"].stale
    assert rows["b"].age == pytest.approx(6.2)
    assert w.live(now) == ["a"]
    assert w.settled(now) == T0 + 11  # a's last record, not b's
    last = w.series(T0 + 10, T0 + 11)[0]
    assert (last.sse, last.ws, last.replicas) == (2, 0, 1)  # b's connections are gone from the totals
    assert w.top_channels(T0 + 11, 4, now)[0].subscribers == 0  # subscribers only from live replicas


def test_a_replica_that_stopped_cleanly_is_shown_stopped_not_stale_and_not_waited_for():
    w = Window(stale_after=5)
    w.add([rec("a", T0 + i, conn={"sse": 1}) for i in range(1, 5)])
    w.add([rec("b", T0 + 1, conn={"sse": 3}), rec("b", T0 + 2, conn={"sse": 3}), rec("b", T0 + 2.5, stopped=True)])
    assert w.live(T0 + 4.2) == ["a"]  # b said it stopped: not waited for, though it is not stale yet
    assert w.settled(T0 + 4.2) == T0 + 4
    assert [p.sse for p in w.series(T0 + 1, T0 + 4)] == [4, 1, 1]  # its connections leave with its last record
    rows = {r.replica: r for r in w.replicas(T0 + 60)}
    assert rows["b"].stopped and not rows["b"].stale
    assert rows["a"].stale and not rows["a"].stopped


def test_the_stopped_flag_is_read_from_a_record():
    doc = {"v": 1, "replica": "a", "ts": T0, "dt": 1, "stopped": 1}
    assert parse_record("1-0", {b"r": orjson.dumps(doc)}).stopped
    assert not parse_record("1-0", {b"r": orjson.dumps({**doc, "stopped": 0})}).stopped


def test_settled_waits_for_the_slowest_live_replica():
    w = Window(stale_after=5)
    w.add([rec("a", T0 + 10.2), rec("b", T0 + 8.7)])
    assert w.settled(T0 + 10.5) == T0 + 8


def test_with_no_replica_reporting_the_bins_still_advance():
    w = Window(stale_after=5)
    assert w.live(T0) == [] and w.settled(T0 + 0.5) == T0 - 5
    assert w.replicas(T0) == [] and w.top_channels(T0, 10, T0) == []
    assert [p.published for p in w.series(T0 - 3, T0)] == [0, 0, 0]


# -- restarts -----------------------------------------------------------------------------------------------
def test_a_replica_restart_never_shows_a_negative_rate():
    w = Window(stale_after=5)
    # The process ran for a while, died at T0+3, and came back (same replica id) at T0+5 with fresh counters.
    before = ch(c_x={"pub": 100, "dlv": 400, "subs": 40})
    w.add([rec("a", T0 + i, started=T0 - 100, conn={"sse": 40}, channels=before) for i in (1, 2, 3)])
    after = [ch(c_x={"pub": 3, "dlv": 3, "subs": 1}), ch(c_x={"pub": 5, "dlv": 10, "subs": 2})]
    w.add([
        rec("a", T0 + 6, started=T0 + 5, conn={"sse": 1}, channels=after[0]),
        rec("a", T0 + 7, started=T0 + 5, conn={"sse": 2}, channels=after[1]),
    ])  # fmt: skip
    points = w.series(T0 + 1, T0 + 7)
    assert all(p.published >= 0 and p.delivered >= 0 for p in points)
    assert [p.published for p in points] == pytest.approx([100, 100, 0, 0, 3, 5])
    assert [p.delivered for p in points] == pytest.approx([400, 400, 0, 0, 3, 10])
    (row,) = w.replicas(T0 + 7)
    assert (row.restarts, row.sse, row.uptime, row.stale) == (1, 2, 2.0, False)


def test_negative_counts_in_a_record_read_as_zero():
    # Whatever a broken or old writer sends, counts below zero are read as zero.
    doc = {"v": 1, "replica": "a", "ts": T0, "dt": 1, "slow": -5, "lat": [-1], "ch": {"c": {"pub": -7}}}
    r = parse_record("1-0", {b"r": orjson.dumps(doc)})
    assert r is not None and r.slow == 0 and r.lat[0] == 0 and r.counts("c")["pub"] == 0


# -- the window ---------------------------------------------------------------------------------------------
def test_window_ignores_duplicates_and_forgets_old_records():
    w = Window(span=60, stale_after=5)
    first = rec("a", T0)
    assert w.add([first, first]) == 1
    w.add([rec("a", T0 + 200)])
    assert [r.ts for r in w.records["a"]] == [T0 + 200]
    assert w.add([first]) == 1  # forgotten, so it counts as new (a reader never re-reads it anyway)


def test_histogram_sums_replicas_over_the_last_seconds():
    counts = two_replicas().histogram(T0 + 5, seconds=2)
    assert counts[LATENCY_BOUNDS_MS.index(1)] == pytest.approx(8)
    assert counts[LATENCY_BOUNDS_MS.index(10)] == pytest.approx(2)


def test_records_frame_has_one_row_per_record_with_rates_and_percentiles():
    w = two_replicas()
    df = records_frame([r for rows in w.records.values() for r in rows])
    assert len(df) == 10 and set(df.replica) == {"a", "b"}
    assert df.loc[df.replica == "b", "delivered_per_s"].tolist() == [31.0] * 5
    assert not math.isnan(df.loc[df.replica == "a", "p50_ms"].iloc[0])


# -- the throttle policy as shown ---------------------------------------------------------------------------
def test_the_policy_document_reads_as_rules_per_pattern_and_limits():
    doc = {"channels": {"*": {"window": 0.0}, "sprint:*": {"poke_rate": 200, "poke_floor": 1}}, "admit_rate": 50}
    view = view_of(doc, version=3)
    assert [r.pattern for r in view.rules] == ["*", "sprint:*"]
    assert view.rules[1].fields() == {"poke_rate": "200", "poke_floor": "1"}
    assert view.limits == {"admit_rate": 50} and "version 3" in view.summary


@pytest.mark.parametrize(
    "doc",
    [{"task:*": {"window": 0.25}}, {"patterns": {"task:*": {"window": 0.25}}}, [{"pattern": "task:*", "window": 0.25}]],
)
def test_other_policy_shapes_read_the_same(doc):
    (rule,) = view_of(doc).rules
    assert rule.pattern == "task:*" and rule.fields() == {"window": "0.25"}


def test_no_policy_document_means_the_settings_policy():
    view = view_of(None)
    assert view.rules == [] and "settings" in view.summary


def test_changing_one_pattern_keeps_the_rest_of_the_document():
    doc = {"channels": {"*": {"window": 0.0}, "a:*": {"window": 1}}, "admit_rate": 5}
    new = with_rule(doc, "b:*", {"poke_rate": 10})
    assert new == {"channels": {"*": {"window": 0.0}, "a:*": {"window": 1}, "b:*": {"poke_rate": 10}}, "admit_rate": 5}
    assert doc["channels"].keys() == {"*", "a:*"}  # not modified in place
    assert with_rule(None, "b:*", {"window": 1}) == {"channels": {"b:*": {"window": 1}}}


# -- the what-if's traffic, the policy in force, the notebook's frames ---------------------------------------
def test_a_policy_pattern_covers_the_labels_it_matches_but_not_the_catch_all():
    w = Window(stale_after=5)
    channels = {"dash:alpha": {"pub": 3, "subs": 1}, "dash:b*": {"pub": 2, "subs": 2}, "*": {"pub": 7},
                "other:x": {"pub": 1}}  # fmt: skip
    w.add([rec("a", T0 + 1, channels=channels), rec("a", T0 + 2, channels=channels)])
    assert w.labels_under("dash:*") == {"dash:alpha", "dash:b*"}
    assert w.labels_under("dash:alpha") == {"dash:alpha"}
    assert w.labels_under("*") == {"*", "dash:alpha", "dash:b*", "other:x"}
    assert w.labels_under("none:*") == frozenset()
    (point,) = w.series(T0 + 1, T0 + 2, w.labels_under("dash:*"))
    assert (point.published, point.subscribers) == (pytest.approx(5), 3)


def test_the_policy_in_force_is_the_settings_policy_until_ops_set_one():
    from dashboard.policy import channel_rows, in_force, limit_rows, rule_for
    from sidecar.core.throttle import ChannelPolicy, Policy

    defaults = Policy.from_json({"channels": {"*": {"window": 0.1}}, "queue_frames": 500})
    policy, source = in_force(view_of(None), defaults)
    assert (policy, source) == (defaults, "settings")
    assert channel_rows(policy, source) == [
        {"pattern": "*", "window": 0.1, "poke_rate": 0.0, "poke_floor": 0.0, "from": "settings"}
    ]
    assert {"limit": "queue_frames", "value": 500} in limit_rows(policy)

    policy, source = in_force(view_of({"channels": {"a:*": {"poke_rate": 5}, "a:b*": {"window": 1}}}), defaults)
    assert source == "ops"
    assert [r["pattern"] for r in channel_rows(policy)] == ["a:b*", "a:*", "*"]  # the order they are matched in
    assert policy.queue_frames == 500  # what ops left out comes from the settings, as the relay does
    assert rule_for(policy, "a:*") == ChannelPolicy(poke_rate=5)
    assert rule_for(policy, "new:*") == ChannelPolicy(window=0.1)  # a new pattern's channels get "*" now
    assert in_force(view_of({"channels": {"x": {"window": 99}}}), defaults)[0] == defaults


def test_latency_frame_is_tidy_and_its_percentiles_merge_buckets():
    from dashboard.sources import frame_percentile, latency_frame

    records = [rec("a", T0 + 1, lat=lat(b1=50)), rec("b", T0 + 1, lat=lat(b2=50)), rec("a", T0 + 2)]
    frame = latency_frame(records)
    assert list(frame.columns) == ["time", "replica", "le_ms", "writes"]
    assert frame[["replica", "le_ms", "writes"]].values.tolist() == [["a", 1, 50], ["b", 2, 50]]
    assert frame_percentile(frame, 50) == pytest.approx(1.0)  # the two replicas' buckets, merged
    assert frame_percentile(frame[frame.replica == "b"], 50) == pytest.approx(1.5)
    assert frame_percentile(frame.iloc[0:0], 50) is None


def test_percentile_by_groups_and_an_empty_frame_has_the_columns():
    from dashboard.sources import latency_frame, percentile_by

    records = [rec("a", T0 + 1, lat=lat(b1=50)), rec("a", T0 + 2, lat=lat(b2=50)), rec("b", T0 + 1, lat=lat(b10=1))]
    by_replica = percentile_by(latency_frame(records), ["replica"], 50)
    assert by_replica.values.tolist() == [["a", pytest.approx(1.0)], ["b", pytest.approx(7.5)]]
    empty = latency_frame([rec("a", T0 + 1)])
    assert list(percentile_by(empty.assign(minute=empty.time.dt.floor("min")), ["minute", "replica"], 99).columns) == [
        "minute",
        "replica",
        "p99_ms",
    ]


# -- record v2 (docs/dashboard.md, "The stats record"): parsed from the JSON the replicas write ----------------
def v2(replica: str, ts: float, **fields: object) -> Record:
    """A v2 record as JSON, through parse_record (as the feed reads it)."""
    doc = {"v": 2, "replica": replica, "host": replica.split(":")[0], "pid": 1, "port": 8000, "ts": ts, "dt": 1.0,
           "started": T0 - 100, "reader": 1, "conn": {}, "slow": 0, "lat": [0] * N_BUCKETS,
           "herd": {"pending": 0, "spread": 0.0}, "ch": {}, "front": "gevent", "version": "0.1.0",
           **fields}  # fmt: skip
    r = parse_record(f"{int(ts * 1000)}-{next(_seq)}", {b"r": orjson.dumps(doc)})
    assert r is not None
    return r


def pub_record(replica: str, ts: float, n: int, ack: tuple[int, ...]) -> Record:
    doc = {"v": 2, "kind": "pub", "replica": replica, "host": "worker", "pid": 7, "ts": ts, "dt": 1.0, "n": n,
           "ack": list(ack)}  # fmt: skip
    r = parse_record(f"{int(ts * 1000)}-{next(_seq)}", {b"r": orjson.dumps(doc)})
    assert r is not None and r.kind == "pub"
    return r


def test_a_v2_record_reads_every_new_field_and_a_v1_record_leaves_them_empty():
    qd = [3, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    r = v2("web-1:1", T0 + 1, stage={"read": list(lat(b1=2)), "held": list(lat(b200=1)), "queue": list(lat(b2=3))},
           shards={"0": {"lag": 3.5, "reconn": 1}, "1": {"lag": None, "reconn": 0}},
           adm={"ok": 4, "defer": 2, "rej": 1, "tries": 7, "level": 2.5, "rate": 10, "burst": 20}, qd=qd,
           slowest=[{"t": "ws", "ch": 3, "qb": 5000, "qf": 12, "age": 4.0}], stuck=1,
           ch={"orders:*": {"pub": 5, "dlv": 5, "subs": 1, "lat": list(lat(b5=5)),
                            "modes": {"event": 1, "poke": 0}}})  # fmt: skip
    assert (r.front, r.version, r.stuck) == ("gevent", "0.1.0", 1)
    assert r.stage["held"] == lat(b200=1) and r.shards == {"0": (3.5, 1), "1": (None, 0)}
    assert r.adm["defer"] == 2 and r.adm["level"] == 2.5 and r.qd == tuple(qd)
    assert r.channels["orders:*"] == {"pub": 5, "dlv": 5, "subs": 1}  # the histogram and modes kept apart
    assert r.ch_lat["orders:*"] == lat(b5=5) and r.modes["orders:*"] == {"event": 1, "poke": 0}
    old = parse_record("1-0", {b"r": orjson.dumps({"v": 1, "replica": "x", "ts": T0, "dt": 1})})
    assert old is not None and (old.kind, old.stage, old.shards, old.adm, old.qd, old.front) == (
        "relay",
        {},
        {},
        {},
        (),
        "",
    )


def test_records_of_a_kind_the_dashboard_does_not_know_are_skipped():
    doc = {"v": 2, "kind": "gateway", "replica": "x", "ts": T0, "dt": 1}
    assert parse_record("1-0", {b"r": orjson.dumps(doc)}) is None
    relay = {"v": 2, "kind": "relay", "replica": "x", "ts": T0, "dt": 1}
    assert parse_record("1-0", {b"r": orjson.dumps(relay)}) is not None


def test_stage_latencies_sum_over_replicas_and_publishers_ack_comes_from_their_records():
    w = Window(stale_after=5)
    for i in range(1, 4):
        w.add([v2("a:1", T0 + i, stage={"read": list(lat(b1=4)), "queue": list(lat(b2=1))}),
               v2("b:1", T0 + i, stage={"read": list(lat(b10=4)), "held": list(lat(b500=2))}),
               pub_record("worker:7", T0 + i, n=6, ack=lat(b0_5=5, b1=1))])  # fmt: skip
    points = w.series(T0 + 1, T0 + 3)
    assert [p.stage["read"][LATENCY_BOUNDS_MS.index(1)] for p in points] == pytest.approx([4, 4])
    assert [sum(p.stage["read"]) for p in points] == pytest.approx([8, 8])
    assert points[0].stage_p("held", 50) == pytest.approx(350)  # halfway into (200, 500]
    assert points[0].stage_p("queue", 100) == pytest.approx(2)
    assert [p.publishes for p in points] == pytest.approx([6, 6])
    assert points[0].stage_p("ack", 50) == pytest.approx(0.3)  # the 3rd of 6, in (0, 0.5]
    # Publishers write only when they publish: no plot waits for them, and they are not replicas.
    assert w.live(T0 + 3) == ["a:1", "b:1"] and [r.replica for r in w.replicas(T0 + 3)] == ["a:1", "b:1"]
    assert w.publishers(T0 + 4) == [("worker:7", 1.0, 18)]


def test_the_coalescing_ratio_is_messages_in_over_frames_out_of_replicas_with_subscribers():
    # 20 messages/s; replica a (a subscriber, window 0.25 s) lets 4 out, b has no subscriber and throttles none.
    w = Window(stale_after=5)
    for i in range(1, 4):
        w.add([v2("a:1", T0 + i, ch={"orders:*": {"pub": 20, "coal": 16, "dlv": 4, "subs": 1}}),
               v2("b:1", T0 + i, ch={"orders:*": {"pub": 20}}),
               v2("c:1", T0 + i, ch={"other:*": {"pub": 10, "dlv": 10, "subs": 1}})])  # fmt: skip
    points = w.series(T0 + 1, T0 + 3, "orders:*")
    assert [p.coalescing for p in points] == pytest.approx([5, 5])
    assert [p.coalescing for p in w.series(T0 + 1, T0 + 3, "other:*")] == pytest.approx([1, 1])
    assert Window().series(T0, T0 + 1)[0].coalescing is None


def test_frames_out_count_the_windows_a_replica_flushed_shared_by_the_patterns_it_held():
    # 20 messages/s: 2 sent at once, 18 held (coalesced) and let out by 3 window flushes: 5 frames out. The
    # 4 "held" observations include 1 spread poke (counted in "delay"), which is no window.
    held = list(lat(b200=4))
    w = Window(stale_after=5)
    w.add([v2("a:1", T0 + 1, stage={"held": held}, ch={"orders:*": {"pub": 20, "coal": 18, "subs": 1},
                                                       "pokes:*": {"pub": 1, "delay": 1, "subs": 1}})])  # fmt: skip
    assert w.series(T0, T0 + 1, "orders:*")[0].coalescing == pytest.approx(20 / 5)
    # Two patterns held: the 3 flushes are shared by their coalesced messages (18 : 6).
    w = Window(stale_after=5)
    w.add(
        [
            v2(
                "a:1",
                T0 + 1,
                stage={"held": list(lat(b200=4))},
                ch={"orders:*": {"pub": 20, "coal": 18, "subs": 1}, "task:*": {"pub": 8, "coal": 6, "subs": 1}},
            )
        ]
    )
    assert w.series(T0, T0 + 1, "orders:*")[0].coal_out == pytest.approx(2 + 3)
    assert w.series(T0, T0 + 1, "task:*")[0].coal_out == pytest.approx(2 + 1)
    # A window that closes in the next record (nothing new coalesced there) still counts, for its subscribers.
    w.add([v2("a:1", T0 + 2, stage={"held": list(lat(b200=1))}, ch={"orders:*": {"subs": 3}, "task:*": {"subs": 1}})])
    assert w.series(T0 + 1, T0 + 2, "orders:*")[0].coal_out == pytest.approx(0.75)
    assert sum(p.coal_out for p in w.series(T0, T0 + 2)) == pytest.approx(2 + 3 + 2 + 1 + 1)


def test_frames_out_are_exact_when_the_record_counts_each_patterns_windows_flushed():
    # Windows counted per pattern ("win"): 2 for orders:*, 1 for task:*, where the estimate would share the 4
    # "held" observations that are no poke 18 : 6 (3 and 1; the fifth is a poke spread in the record before).
    w = Window(stale_after=5)
    ch = {"orders:*": {"pub": 20, "coal": 18, "win": 2, "subs": 1}, "task:*": {"pub": 8, "coal": 6, "win": 1,
          "subs": 1}, "pokes:*": {"pub": 1, "delay": 1, "subs": 1}}  # fmt: skip
    w.add([v2("a:1", T0 + 1, stage={"held": list(lat(b200=5))}, ch=ch)])
    assert w.series(T0, T0 + 1, "orders:*")[0].coal_out == pytest.approx(2 + 2)
    assert w.series(T0, T0 + 1, "task:*")[0].coal_out == pytest.approx(2 + 1)
    assert w.series(T0, T0 + 1, "pokes:*")[0].coal_out == pytest.approx(1)  # counted: none of its windows
    assert w.series(T0, T0 + 1)[0].flushed == pytest.approx(3)
    # A record that counts flushes and flushed none: no estimate from its "held" observations.
    w.add([v2("a:1", T0 + 2, stage={"held": list(lat(b200=2))},
              ch={"orders:*": {"pub": 4, "coal": 1, "subs": 1}, "task:*": {"win": 1, "subs": 1}})])  # fmt: skip
    assert w.series(T0 + 1, T0 + 2, "orders:*")[0].coal_out == pytest.approx(3)
    assert w.series(T0 + 1, T0 + 2, "task:*")[0].coal_out == pytest.approx(1)


def test_admission_counts_are_rates_and_the_bucket_level_a_gauge_of_the_live_replicas():
    w = Window(stale_after=5)
    for i in range(1, 4):
        w.add([v2("a:1", T0 + i, adm={"ok": 10, "defer": 3, "rej": 1, "tries": 14, "level": 0.5, "rate": 10,
                                       "burst": 20}),
               v2("b:1", T0 + i, adm={"ok": 2, "tries": 2, "level": 8, "rate": 10, "burst": 20})])  # fmt: skip
    p = w.series(T0 + 1, T0 + 3)[0]
    assert (p.admitted_conn, p.deferred, p.refused, p.attempts) == pytest.approx((12, 3, 1, 16))
    assert (p.bucket, p.admit_rate, p.admit_burst) == pytest.approx((8.5, 20, 40))


def test_queue_depth_percentiles_stuck_closes_and_the_slowest_connections():
    w = Window(stale_after=5)
    qd_a = [8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]  # 8 empty queues, one with 1 frame, one with 501-1000
    qd_b = [10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    slow_a = [{"t": "ws", "ch": 2, "qb": 9000, "qf": 800, "age": 30.0}, {"t": "sse", "ch": 1, "qb": 10, "qf": 1,
                                                                         "age": 5.0}]  # fmt: skip
    slow_b = [{"t": "sse", "ch": 4, "qb": 700, "qf": 3, "age": 2.0}]
    w.add([v2("a:1", T0 + 1, qd=qd_a, slowest=slow_a, stuck=1), v2("b:1", T0 + 1, qd=qd_b, slowest=slow_b)])
    w.add([v2("a:1", T0 + 2, qd=qd_a, slowest=slow_a), v2("b:1", T0 + 2, qd=qd_b, slowest=slow_b)])
    p = w.series(T0 + 1, T0 + 2)[0]
    assert sum(p.queue_depth) == 20 and p.depth_p(50) == 0
    assert p.depth_p(99) == pytest.approx(900)  # 19.8 of 20: 4/5 into (500, 1000]
    assert p.stuck == pytest.approx(0)  # the close was counted in the second before
    assert w.series(T0, T0 + 1)[0].stuck == pytest.approx(1)
    rows = w.slowest(T0 + 2, n=2)
    assert [(r.replica, r.transport, r.channels, r.queued_bytes, r.queued_frames) for r in rows] == [
        ("a:1", "ws", 2, 9000, 800), ("b:1", "sse", 4, 700, 3)]  # fmt: skip


def test_fleet_rows_per_replica_and_per_shard_with_lag_reconnects_front_and_version():
    w = Window(stale_after=5)
    w.add([v2("a:1", T0 + 1, shards={"0": {"lag": 2, "reconn": 1}, "1": {"lag": 40, "reconn": 0}}),
           v2("a:1", T0 + 2, shards={"0": {"lag": 1, "reconn": 0}, "1": {"lag": 30, "reconn": 2}}),
           v2("b:1", T0 + 2, front="asyncio", version="0.2.0", shards={"0": {"lag": 9, "reconn": 0},
                                                                     "1": {"lag": None, "reconn": 0}}),
           v2("c:1", T0 + 2, stopped=1, shards={"0": {"lag": 500, "reconn": 9}})])  # fmt: skip
    a, b, c = w.replicas(T0 + 3)
    assert (a.front, a.version, a.lag_ms, a.reconnects) == ("gevent", "0.1.0", 30, 3)
    assert (b.front, b.version, b.lag_ms, b.reconnects) == ("asyncio", "0.2.0", 9, 0)
    assert c.stopped and not c.stale
    s0, s1 = w.shards(T0 + 3)
    assert (s0.shard, s0.replicas, s0.lag_ms, s0.worst, s0.reconnects) == ("0", 2, 9, "b:1", 10)
    assert (s1.shard, s1.replicas, s1.lag_ms, s1.worst, s1.reconnects) == ("1", 2, 30, "a:1", 2)
    assert s0.age == pytest.approx(1)
    p = w.series(T0 + 1, T0 + 2)[0]  # the second the records at T0 + 2 cover; the gauges of those before it
    assert p.lag == 40 and p.reconnects == pytest.approx(2 + 9)


def test_the_heatmap_has_one_cell_per_second_and_bucket_with_writes():
    w = Window(stale_after=5)
    w.add([v2("a:1", T0 + 1, lat=list(lat(b1=3, b50=1))), v2("a:1", T0 + 2, lat=list(lat(b1=2)))])
    cells = heat_rows(w.series(T0, T0 + 2))
    i1, i50 = LATENCY_BOUNDS_MS.index(1), LATENCY_BOUNDS_MS.index(50)
    assert list(zip(cells["t"], cells["bucket"], cells["count"])) == [(T0, i1, 3), (T0, i50, 1), (T0 + 1, i1, 2)]


def test_stages_frame_is_tidy_and_gives_the_p99_per_pattern():
    records = [
        v2("a:1", T0 + 1, stage={"read": list(lat(b1=1))}, ch={"orders:*": {"pub": 1, "lat": list(lat(b5=99,
                                                                                                      b500=1))},
                                                              "task:*": {"pub": 1, "lat": list(lat(b2=10))}}),
        pub_record("worker:7", T0 + 1, n=2, ack=lat(b1=2)),
    ]  # fmt: skip
    frame = stages_frame(records)
    assert set(frame.stage) == {"lat", "read", "ack"} and list(frame.columns) == [
        "time", "replica", "stage", "pattern", "le_ms", "n"]  # fmt: skip
    per_pattern = percentile_by(frame[(frame.stage == "lat") & (frame.pattern != "")], ["pattern"], 99)
    p99 = dict(zip(per_pattern.pattern, per_pattern.p99_ms))
    assert p99["orders:*"] == pytest.approx(5) and p99["task:*"] == pytest.approx(1.99)  # rank 9.9 of 10 in (1, 2]
    assert stages_frame([]).empty and list(stages_frame([]).columns) == list(frame.columns)


def test_the_policy_log_reads_as_changes_newest_first():
    entries = [
        (b"1800000005000-0", {b"at": b"1800000005.5", b"who": b"ops-anna", b"what": b"orders:* window 0 -> 0.5 s",
                              b"policy": b'{"channels": {"orders:*": {"window": 0.5}}}'}),
        (b"1800000001000-0", {b"at": b"1800000001", b"who": b"admin", b"what": b"", b"policy": b""}),
        (b"1800000000000-0", {b"who": b"nobody"}),  # no time: skipped
    ]  # fmt: skip
    changes = [c for c in (parse_change(i, f) for i, f in entries) if c is not None]
    assert [(c.at, c.who, c.what) for c in changes] == [
        (1800000005.5, "ops-anna", "orders:* window 0 -> 0.5 s"),
        (1800000001.0, "admin", "back to the settings' policy"),
    ]
    frame = changes_frame(changes)
    assert list(frame.who) == ["admin", "ops-anna"]  # oldest first, like the other frames


def test_the_dashboard_uses_a_named_admin_key_when_no_unnamed_one_is_set():
    from dashboard.feed import DashboardConfig

    named = "ops-anna:" + "a" * 32 + ",ops-bo:" + "b" * 32
    assert DashboardConfig.from_env({"SIDECAR_ADMIN_KEYS": named}).admin_key == "a" * 32
    assert DashboardConfig.from_env({"SIDECAR_ADMIN_KEY": "k" * 32, "SIDECAR_ADMIN_KEYS": named}).admin_key == "k" * 32
    assert DashboardConfig.from_env({}).admin_key is None
    assert DashboardConfig.from_env({"SIDECAR_KEY_PREFIX": "x"}).log_key == "x:policy:log"


def test_poke_subscribers_are_counted_from_v2_modes_and_unknown_in_v1():
    w = Window(stale_after=5)
    w.add([v2("a:1", T0 + 1, ch={"orders:*": {"subs": 3, "modes": {"event": 2, "poke": 1}},
                                 "task:*": {"subs": 2, "modes": {"poke": 2}}}),
           v2("b:1", T0 + 1, ch={"orders:*": {"subs": 1, "modes": {"poke": 1}}})])  # fmt: skip
    p = w.series(T0 + 1, T0 + 2, "orders:*")[0]
    assert (p.subscribers, p.poke_subscribers) == (4, 2)
    assert w.series(T0 + 1, T0 + 2)[0].poke_subscribers == 4
    old = Window(stale_after=5)
    old.add([rec("a", T0 + 1, channels=ch(orders_x={"subs": 3}))])
    assert old.series(T0 + 1, T0 + 2)[0].poke_subscribers is None


def test_top_channels_have_the_p99_of_each_patterns_frames_from_v2_records():
    w = Window(stale_after=5)
    for i in range(1, 11):
        w.add([v2("a:1", T0 + i, ch={"orders:*": {"pub": 10, "dlv": 10, "subs": 1, "lat": list(lat(b5=9, b500=1))},
                                     "task:*": {"pub": 1}}),
               v2("b:1", T0 + i, ch={"orders:*": {"pub": 10, "subs": 1, "lat": list(lat(b5=10))}})])  # fmt: skip
    rows = {r.pattern: r for r in w.top_channels(T0 + 10, 5, T0 + 10)}
    # 5 s of both replicas: 95 writes in (2, 5] and 5 in (200, 500]; the 99th of 100 is 4/5 into (200, 500].
    assert rows["orders:*"].p99 == pytest.approx(200 + 300 * 4 / 5)
    assert rows["task:*"].p99 is None
