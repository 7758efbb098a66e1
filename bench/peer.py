"""The peer: Flask-SocketIO on gevent with `message_queue` on Redis, the way Celery workers use it today.

    REDIS_URL=redis://127.0.0.1:6379/0 python -m bench.peer --port 9001

Clients connect (engine.io 4 over WebSocket), emit `join` with a room name and are acknowledged; an external
emitter (:func:`emitter`, in another process) then emits `msg` to the room through Redis.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402

from flask import Flask  # noqa: E402
from flask_socketio import SocketIO, join_room  # noqa: E402


def create(redis_url: str) -> tuple[Flask, SocketIO]:
    app = Flask(__name__)
    sio = SocketIO(app, async_mode="gevent", message_queue=redis_url, cors_allowed_origins="*")

    @sio.on("join")
    def join(room: str) -> str:
        join_room(room)
        return "ok"

    @app.get("/healthz")
    def healthz() -> str:
        return "ok"

    return app, sio


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app, sio = create(os.environ["REDIS_URL"])
    sio.run(app, host="127.0.0.1", port=args.port, log_output=False)


if __name__ == "__main__":
    main()
