"""The run's summary: one table row per record, the ratios the targets are stated in, and the latency plot."""

from __future__ import annotations

from pathlib import Path


def record_of(records: list[dict], server: str, transport: str, clients: int = 1000) -> dict | None:
    for r in records:
        if (r.get("scenario"), r.get("server"), r.get("transport"), r.get("clients")) == (
            "fanout", server, transport, clients,
        ):  # fmt: skip
            return r
    return None


def best(records: list[dict], server: str, transport: str, clients: int = 1000) -> float | None:
    r = record_of(records, server, transport, clients)
    return None if r is None else r["best_deliveries_per_s"]


def cpu_at_100k(records: list[dict], server: str, transport: str, clients: int = 1000) -> float | None:
    """Server CPU us per delivery at 100k deliveries/s (per delivery made: a server behind made fewer)."""
    r = record_of(records, server, transport, clients)
    return (r.get("at_100k") or {}).get("cpu_us_per_delivery") if r is not None else None


def ratios(records: list[dict], clients: int = 1000) -> dict:
    """The fanout figures as ratios of baselines measured in the same run (N=1,000), for each front that ran:
    the highest rate held, and the deliveries per CPU-second at 100k/s (`_cpu_vs_peer_at_100k`)."""
    out: dict = {"scenario": "ratios"}
    peer = best(records, "peer", "ws", clients)
    peer_cpu = cpu_at_100k(records, "peer", "ws", clients)
    for server, label in (("sidecar", "sidecar"), ("sidecar-asgi", "asgi")):
        for transport in ("sse", "ws"):
            mine = best(records, server, transport, clients)
            batched = best(records, "raw-batched", transport, clients)
            single = best(records, "raw-single", transport, clients)
            if mine is None:
                continue
            if peer:
                out[f"{label}_{transport}_vs_peer"] = round(mine / peer, 2)
            if batched:
                out[f"{label}_{transport}_vs_raw_batched"] = round(mine / batched, 2)
            if single:
                out[f"{label}_{transport}_vs_raw_single"] = round(mine / single, 2)
            mine_cpu = cpu_at_100k(records, server, transport, clients)
            if peer_cpu and mine_cpu:
                out[f"{label}_{transport}_cpu_vs_peer_at_100k"] = round(peer_cpu / mine_cpu, 2)
    return out


def row(r: dict) -> str:
    s = r.get("scenario")
    if s == "fanout":
        at = r.get("at_100k")
        extra = f"  @100k/s p50 {at['p50']} p99 {at['p99']} ms lost {at['lost']} cpu {at['cpu']}%" if at else ""
        return (f"fanout      {r['server']:<12} {r['transport']:<3} n={r['clients']:<5} "
                f"best {r['best_deliveries_per_s']:>8,}/s  idle RSS {r['rss_idle_mb']} MB{extra}")  # fmt: skip
    if s == "spread":
        return (f"spread      {r['subscriptions']:,} subs / {r['channels']:,} channels: {r['deliveries_per_s']:,}/s "
                f"p50 {r['p50']} p99 {r['p99']} max {r['max']} ms lost {r['lost']} cpu {r['cpu']}%")  # fmt: skip
    if s == "connections":
        return (f"connections {r['server']:<8} {r['connections']:,} idle: {r['rss_per_conn_kb']} KB/conn, "
                f"idle CPU {r['idle_cpu']}%, closed {r['closed_during_hold']}")  # fmt: skip
    if s == "celery":
        return (f"celery      {r.get('server', 'sidecar'):<8} "
                f"publish->seen p50 {r['p50']} p95 {r['p95']} p99 {r['p99']} ms; "
                f"send_task->seen p50 {r['send_to_seen_p50']} p99 {r['send_to_seen_p99']} ms")  # fmt: skip
    if s == "polling":
        return (f"polling     {r['style']:<4} {r['requests_per_s']:>5} req/s  sidecar CPU {r['cpu_sidecar']}%  "
                f"redis CPU {r['cpu_redis']}%  "
                f"freshness p50 {r['freshness_p50']} p99 {r['freshness_p99']} ms")  # fmt: skip
    if s == "redis":
        return (
            f"redis       XADD pipelined {r['xadd_pipelined_per_s']:,}/s, publish script "
            f"{r['publish_script_pipelined_per_s']:,}/s, XREAD BLOCK p50 {r['xread_p50']} p99 {r['xread_p99']} ms"
        )
    if s == "herd" and "capped" in r:
        c, u = r["capped"], r["uncapped"]
        return (f"herd        {r['subscribers']:,} pokes, cap {r['cap']:g}/s: capped {c['pulls_per_s']} pulls/s "
                f"(busiest 100 ms {c['busiest_100ms']}), uncapped {u['pulls_per_s']} pulls/s "
                f"(busiest 100 ms {u['busiest_100ms']})")  # fmt: skip
    if s == "ratios":
        return "ratios      " + "  ".join(f"{k}={v}" for k, v in r.items() if k != "scenario")
    keys = [k for k in r if k != "scenario"][:8]
    return f"{s:<11} " + "  ".join(f"{k}={r[k]}" for k in keys)


def plot(records: list[dict], path: Path) -> Path | None:
    """p99 (solid) and p50 (dotted) latency against deliveries/s for the sidecar and the peer; the raw
    ceilings as vertical lines."""
    fanouts = [r for r in records if r.get("scenario") == "fanout"]
    if not fanouts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=100)
    colors = {"sidecar": "tab:blue", "peer": "tab:red"}
    for r in fanouts:
        if r["server"].startswith("sidecar@"):
            colors[r["server"]] = "tab:purple"  # the same sidecar from another checkout (--compare)
        if r["server"] not in colors:
            continue
        steps = [s for s in r["steps"] if s["p99"] is not None]
        xs = [s["deliveries_per_s"] / 1000 for s in steps]
        style = "-" if r["transport"] == "sse" else "--"
        label = f"{r['server']} {r['transport'].upper()} n={r['clients']}"
        marker = "o" if r["clients"] == 1000 else "s"
        color = colors[r["server"]]
        alpha = 1.0 if r["clients"] == 1000 else 0.5
        ax.plot(xs, [s["p99"] for s in steps], style, marker=marker, color=color, alpha=alpha, label=label + " p99")
    for r in fanouts:
        if r["server"].startswith("raw-") and r["clients"] == 1000:
            ls = "-" if r["server"] == "raw-batched" else ":"
            color = "tab:green" if r["transport"] == "sse" else "tab:olive"
            ax.axvline(r["best_deliveries_per_s"] / 1000, color=color, linestyle=ls, linewidth=1,
                       label=f"{r['server']} {r['transport'].upper()} ceiling")  # fmt: skip
    ax.axhline(100, color="grey", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("deliveries/s (thousands, log scale), one channel")
    ax.set_ylabel("p99 latency, publish -> frame read (ms)")
    ax.set_title("fanout: p99 latency against delivery rate (same run, same machine)")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
