"""The WSGI app for gunicorn (`gunicorn -c sidecar/gunicorn.conf.py`); the gevent worker patches first."""

from sidecar.app import create_app
from sidecar.config import Settings

app = create_app(Settings.from_env())
app.extensions["relay"].start()
