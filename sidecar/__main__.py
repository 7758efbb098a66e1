"""``python -m sidecar``: the same commands as the ``sidecar`` script."""

import sys

# The server runs on gevent, and gevent must patch the standard library before Flask, redis or anything
# else that touches sockets, threads or time is imported; patched late, gevent.pywsgi hangs after one
# connection. So the serving commands patch here, before the CLI (and through it the app) is imported.
# The other commands (dashboard, bench) must not be patched.
if len(sys.argv) > 1 and sys.argv[1] in ("serve", "demo"):
    from gevent import monkey

    monkey.patch_all()

from sidecar.cli import main  # noqa: E402

raise SystemExit(main())
