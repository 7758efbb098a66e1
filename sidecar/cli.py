"""`sidecar serve | demo | dashboard | bench`.

Only the standard library is imported here: `serve` and `demo` must let gevent patch before Flask or redis load.
"""

from __future__ import annotations

import argparse
import os
import sys


def _patch() -> None:
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        monkey.patch_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sidecar", description="Realtime relay for Celery")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the relay (gevent); settings from SIDECAR_* and REDIS_URL")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--dev", action="store_true", default=None, help="allow running without auth secrets")
    demo = sub.add_parser("demo", help="the whole stack on an embedded Redis, with demo traffic")
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument("--dashboard-port", type=int, default=5006)
    demo.add_argument("--no-dashboard", action="store_true")
    dash = sub.add_parser("dashboard", help="serve the Panel dashboard")
    dash.add_argument("--host", default="127.0.0.1")
    dash.add_argument("--port", type=int, default=5006)
    sub.add_parser("bench", help="run the benchmark suite (bench/)")
    args = parser.parse_args(argv)

    if args.command in ("serve", "demo"):
        _patch()
    from sidecar.config import Settings

    if args.command == "serve":
        from sidecar.serve import serve as run

        run(Settings.from_env(host=args.host, port=args.port, dev=args.dev))
        return 0
    if args.command == "demo":
        from sidecar.demo import run_demo

        return run_demo(Settings.from_env(dev=True, port=args.port), args.dashboard_port, not args.no_dashboard)
    if args.command == "dashboard":
        env = dict(os.environ)
        app = os.path.join(os.getcwd(), "dashboard", "app.py")
        cmd = [
            sys.executable,
            "-m",
            "panel",
            "serve",
            app,
            "--address",
            args.host,
            "--port",
            str(args.port),
            "--allow-websocket-origin",
            f"{args.host}:{args.port}",
            "--allow-websocket-origin",
            f"localhost:{args.port}",
        ]
        os.execvpe(cmd[0], cmd, env)
    if args.command == "bench":
        os.execvp(sys.executable, [sys.executable, "-m", "bench"])
    return 2
