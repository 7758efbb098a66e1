"""`sidecar serve | demo | dashboard | bench`.

Only the standard library is imported here (sidecar.config is standard library only): `serve` and `demo` must
let gevent patch before Flask or redis load.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import socket
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from sidecar.config import Settings

DEFAULTS = Settings()
DASHBOARD_PORT = 5006  # Bokeh's default
CHECKOUT = Path(__file__).resolve().parents[1]  # the repository, when this runs from a checkout
DOC = "every setting is an environment variable (SIDECAR_<NAME>, and REDIS_URL): docs/settings.md"


def _patch() -> None:
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        monkey.patch_all()


def port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be listened on now (SO_REUSEADDR, as servers bind: TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def port_taken(what: str, host: str, port: int, *how: str) -> str:
    """The message for a busy port: what it was for, and how to pick another (``how``: ways to say the port, with
    ``{}`` where the port goes)."""
    ways = ", or ".join(h.format(port + 1) for h in how)
    return f"the {what} port {host}:{port} is in use (another server is listening there). Pick another: {ways}."


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="Realtime relay for Celery: tasks publish to Redis streams, the sidecar relays them over SSE and "
        "WebSocket.",
        epilog=f"Run `sidecar <command> --help` for a command's options. Besides the options, {DOC}.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,demo,dashboard,bench}")

    serve = sub.add_parser(
        "serve",
        help="run the relay (gevent.pywsgi); production runs gunicorn -c sidecar/gunicorn.conf.py",
        description="Run the relay on gevent.pywsgi. Without REDIS_URL it starts an embedded redis-server (data in "
        f"SIDECAR_DATA_DIR, default {d.data_dir}). Without a token key (SIDECAR_JWT_SECRET or "
        "SIDECAR_JWT_PUBLIC_KEY) it refuses to start unless in dev mode.",
        epilog=f"An option wins over its environment variable; {DOC}.",
    )
    serve.add_argument("--host", help=f"address to listen on (default: {d.host}; env SIDECAR_HOST)")
    serve.add_argument("--port", type=int, help=f"port to listen on (default: {d.port}; env SIDECAR_PORT)")
    serve.add_argument(
        "--front",
        choices=("gevent", "asgi"),
        default="gevent",
        help="gevent: Flask on gevent.pywsgi; asgi: the Starlette app (sidecar.asgi) on uvicorn (default: gevent; "
        "no environment variable)",
    )
    serve.add_argument(
        "--dev",
        action="store_true",
        default=None,
        help="dev mode: run without auth secrets, open to anyone, and say so (default: off; env SIDECAR_DEV=1)",
    )

    demo = sub.add_parser(
        "demo",
        help="the whole stack on an embedded Redis, with demo traffic (make demo)",
        description="Run an embedded redis-server (unless REDIS_URL is set), a Celery worker of the reference app "
        "(tasks/, so from a checkout only), the relay in dev mode, the dashboard and demo traffic; print the URLs. "
        "Ctrl-C stops them in order: traffic, worker (warm shutdown), relay, dashboard, Redis. The demo's state "
        f"(Redis data, its URL in redis.url, logs) is in SIDECAR_DATA_DIR (default {d.data_dir}); `make clean` "
        "removes it. A throttle policy left by a previous run is reset at start.",
        epilog=f"An option wins over its environment variable; {DOC}.",
    )
    demo.add_argument("--host", help=f"address of the relay and the dashboard (default: {d.host}; env SIDECAR_HOST)")
    demo.add_argument(
        "--port", type=int, help=f"the relay's port (default: {d.port}; env SIDECAR_PORT; make demo PORT=...)"
    )
    demo.add_argument(
        "--dashboard-port",
        type=int,
        default=DASHBOARD_PORT,
        help=f"the dashboard's port (default: {DASHBOARD_PORT}; no environment variable; make demo DASHBOARD_PORT=...)",
    )
    demo.add_argument(
        "--no-dashboard",
        action="store_true",
        help="do not start the dashboard (default: start it when the dashboard extra is installed; no environment "
        "variable)",
    )

    dash = sub.add_parser(
        "dashboard",
        help="serve the Panel dashboard (the dashboard extra)",
        description="Serve the live dashboard at http://HOST:PORT/app. It reads the stats stream from REDIS_URL; "
        f"unset, from the Redis a running `sidecar demo` recorded in {d.data_dir}/redis.url (SIDECAR_DATA_DIR), "
        "else redis://127.0.0.1:6379/0. Its throttle controls call SIDECAR_URL's admin API with SIDECAR_ADMIN_KEY.",
        epilog=f"{DOC[0].upper()}{DOC[1:]}.",
    )
    dash.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; no environment "
                      "variable)")  # fmt: skip
    dash.add_argument(
        "--port", type=int, default=DASHBOARD_PORT, help=f"port (default: {DASHBOARD_PORT}; no environment variable)"
    )

    sub.add_parser(
        "bench",
        help="run the benchmark suite (bench/: from a checkout only; make bench)",
        description="Run the benchmark suite in bench/. It is not part of the installed package: run it from a "
        "checkout of the repository (make bench installs its extra).",
    )
    return parser


def _settings(**overrides: Any) -> Settings | None:
    """The settings, or None after one line on stderr naming the bad setting (no traceback for a typo)."""
    try:
        return Settings.from_env(**overrides)
    except ValueError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    if args.command == "demo" or (args.command == "serve" and args.front == "gevent"):
        _patch()

    if args.command == "serve":
        if args.front == "asgi":
            from sidecar.asgi import serve as run
        else:
            from sidecar.serve import serve as run

        settings = _settings(host=args.host, port=args.port, dev=args.dev)
        if settings is None:
            return 2
        run(settings)
        return 0
    if args.command == "demo":
        from sidecar.demo import run_demo

        settings = _settings(dev=True, host=args.host, port=args.port)
        if settings is None:
            return 2
        return run_demo(settings, args.dashboard_port, not args.no_dashboard)
    if args.command == "dashboard":
        return dashboard(args.host, args.port)
    if args.command == "bench":
        if not (CHECKOUT / "bench" / "__main__.py").exists():
            print("sidecar bench: the benchmarks (bench/) are not installed with the package; run `make bench` "
                  "from a checkout of the repository", file=sys.stderr)  # fmt: skip
            return 2
        os.chdir(CHECKOUT)
        os.execvp(sys.executable, [sys.executable, "-m", "bench"])
    return 2


def dashboard_app() -> ModuleType:
    """The dashboard's Panel app: the checkout's dashboard/ when this runs from one, else the installed
    ``sidecar.dashboard`` (the wheel ships dashboard/ under that name)."""
    if (Path(__file__).resolve().parent / "dashboard" / "app.py").exists():
        return importlib.import_module("sidecar.dashboard.app")
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    return importlib.import_module("dashboard.app")


def dashboard(host: str, port: int) -> int:
    if importlib.util.find_spec("panel") is None:
        print("sidecar dashboard needs the dashboard extra: pip install 'celery-realtime-sidecar[dashboard]'",
              file=sys.stderr)  # fmt: skip
        return 2
    if not port_free(host, port):
        print(f"sidecar dashboard: {port_taken('dashboard', host, port, 'sidecar dashboard --port {}')}",
              file=sys.stderr)  # fmt: skip
        return 2
    import panel as pn

    app = dashboard_app()
    origins = [f"{host}:{port}", f"localhost:{port}"]
    pn.serve({"app": app.dashboard}, address=host, port=port, websocket_origin=origins, show=False,
             title="sidecar dashboard")  # fmt: skip
    return 0
