"""The WSGI app for gunicorn (`gunicorn -c sidecar/gunicorn.conf.py`); the gevent worker patches first."""

import logging

from sidecar.app import create_app
from sidecar.auth import check_startup
from sidecar.config import Settings

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
settings = Settings.from_env()
check_startup(settings)  # raises InsecureConfig (gunicorn exits) in production without a token key
app = create_app(settings)
app.extensions["relay"].start()
