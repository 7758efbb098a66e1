"""Profile the sidecar under fanout: `python -m bench.profile [sse|ws] [--front gevent|asgi] [--clients N] [--rate R]
[--seconds S]`.

Starts a redis-server, a sidecar and the load clients, publishes at R msg/s to one channel, and samples the
sidecar with py-spy (`pip install py-spy`) for S seconds. Prints the functions with the most samples, by self
time and by inclusive time, and leaves the collapsed stacks (flamegraph input) in the log directory.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.context import Context
from bench.load import LoadClients
from bench.servers import FRONTS, Meter
from bench.targets import SidecarTarget


def summarise(collapsed: Path, top: int = 25) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    out = [f"{total} samples", "-- self --"]
    out += [f"{n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    out += ["-- inclusive --"]
    out += [f"{n / total:6.1%}  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("transport", nargs="?", choices=("sse", "ws"), default="sse")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0, help="messages/s on the channel")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--front", choices=FRONTS, default="gevent")
    parser.add_argument("--native", action="store_true", help="include native (C) frames")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    ctx = Context(quick=True, log_dir=Path(tempfile.mkdtemp(prefix="sidecar-profile-")))
    with ctx.redis("profile") as server:
        target = SidecarTarget(server.url, ctx.log_dir, args.transport, "profile", front=args.front)
        try:
            with LoadClients(2) as load:
                print(target.open(load, args.clients))
                out = ctx.log_dir / "sidecar.collapsed"
                argv = [spy, "record", "-p", str(target.pid), "-d", str(int(args.seconds)), "-r", "200", "-f", "raw",
                        "-o", str(out), "--nonblocking"] + (["--native"] if args.native else [])  # fmt: skip
                spy_proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                load.mark(from_seq=target.next_seq)
                meter = Meter(target.pid).start()
                count = int(args.rate * args.seconds)
                publisher = threading.Thread(target=target.publish, args=(count, args.rate))
                publisher.start()
                publisher.join()
                load.wait_received(count * args.clients, 3)
                (cpu,) = meter.stop()
                print({k: v for k, v in load.report().items()}, f"cpu={cpu}%")
                spy_proc.wait(30)
        finally:
            target.stop()
    print(summarise(out))
    print(f"collapsed stacks: {out}")
    time.sleep(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
