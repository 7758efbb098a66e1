"""`python -m bench [--quick] [scenario ...]`: run the benchmark scenarios (all of them by default).

Each scenario starts its own redis-server and servers, prints a line as it goes and one JSON record per result;
the run ends with a table, the ratios against the baselines measured in this run, and, when fanout ran, the
latency plot. Everything is on loopback; every process started is stopped by its pid.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import report
from bench.context import Context, cores

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = ("redis", "fanout", "spread", "connections", "celery", "polling", "herd", "readers", "cluster", "wait")


def run_herd(ctx: Context) -> list[dict]:
    """The herd scenario lives in bench/herd.py (its own issue): run it as a child and read its JSON record."""
    if not (REPO / "bench" / "herd.py").exists():
        print("  herd: bench/herd.py is not there yet; skipped", flush=True)
        return []
    args = [] if ctx.quick else ["--subscribers", "5000", "--cap", "1000"]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.herd", *args], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        print(f"  herd failed ({proc.returncode}):\n{proc.stderr[-2000:]}", flush=True)
        return [{"scenario": "herd", "error": proc.returncode}]
    record = json.loads(lines[-1])
    record.setdefault("scenario", "herd")
    return [record]


def run_scenario(name: str, ctx: Context) -> list[dict]:
    if name == "redis":
        from bench import redis_raw

        return redis_raw.run(ctx)
    if name == "fanout":
        from bench import fanout

        return fanout.run(ctx)
    if name == "spread":
        from bench import spread

        return spread.run(ctx)
    if name == "connections":
        from bench import connections

        return connections.run(ctx)
    if name == "celery":
        from bench import celery_e2e

        return celery_e2e.run(ctx)
    if name == "polling":
        from bench import polling

        return polling.run(ctx)
    if name == "readers":
        from bench import readers

        return readers.run(ctx)
    if name == "cluster":
        from bench import cluster_fanout

        return cluster_fanout.run(ctx)
    if name == "wait":
        from bench import wait

        return wait.run(ctx)
    return run_herd(ctx)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "scenarios", nargs="*", metavar="scenario", help=f"any of {', '.join(SCENARIOS)} (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="shorter steps and fewer series (~4 minutes)")
    parser.add_argument("--compare", type=Path, metavar="DIR",
                        help="fanout also runs the sidecar of this other checkout (before/after)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "latest.json")
    parser.add_argument("--plot", type=Path, default=REPO / "bench" / "results" / "fanout.png")
    args = parser.parse_args(argv)
    names = args.scenarios or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    log_dir = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    ctx = Context(quick=args.quick, log_dir=log_dir, compare=args.compare.resolve() if args.compare else None)
    machine = {
        "scenario": "machine", "cores": cores(), "python": platform.python_version(),
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "logs": str(log_dir),
    }  # fmt: skip
    print(json.dumps(machine), flush=True)
    records = [machine]
    t0 = time.monotonic()
    for name in names:
        print(f"== {name}", flush=True)
        started = time.monotonic()
        try:
            got = run_scenario(name, ctx)
        except Exception as exc:  # one broken scenario must not lose the others' figures
            print(f"  {name} failed: {type(exc).__name__}: {exc}", flush=True)
            got = [{"scenario": name, "error": f"{type(exc).__name__}: {exc}"}]
        for record in got:
            record["seconds"] = round(time.monotonic() - started, 1)
            print(json.dumps(record), flush=True)
        records.extend(got)
    if "fanout" in names:
        records.append(report.ratios(records))
    machine["seconds"] = round(time.monotonic() - t0, 1)
    print(f"\n== summary ({machine['cores']} cores, {machine['seconds']} s; logs in {log_dir})")
    for record in records[1:]:
        print(report.row(record) if "error" not in record else f"{record['scenario']:<11} error: {record['error']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1))
    print(f"records: {args.out}")
    if "fanout" in names and report.plot(records, args.plot):
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
