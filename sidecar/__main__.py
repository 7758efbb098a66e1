"""``python -m sidecar``: the same commands as the ``sidecar`` script."""

import sys

# The server runs on gevent, and gevent must patch the standard library before Flask, redis or anything
# else that touches sockets, threads or time is imported; patched late, gevent.pywsgi hangs after one
# connection. So the serving commands patch here, before the CLI (and through it the app) is imported.
# The other commands (dashboard, bench) and the asyncio front (`serve --front asgi`) must not be patched.


def _front(args: list[str]) -> str:
    for i, arg in enumerate(args):
        if arg == "--front" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--front="):
            return arg.partition("=")[2]
    return "gevent"


if len(sys.argv) > 1 and (sys.argv[1] == "demo" or (sys.argv[1] == "serve" and _front(sys.argv[2:]) == "gevent")):
    from gevent import monkey

    monkey.patch_all()

from sidecar.cli import main  # noqa: E402

raise SystemExit(main())
