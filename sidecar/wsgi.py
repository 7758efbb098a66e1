"""The WSGI app for gunicorn (`gunicorn -c sidecar/gunicorn.conf.py`); the gevent worker patches first."""

from sidecar import logs
from sidecar.app import create_app
from sidecar.auth import check_startup
from sidecar.config import Settings

settings = Settings.from_env()
logs.configure(settings.log_level)  # SIDECAR_LOG_LEVEL; redacting (gunicorn's loggers: sidecar/gunicorn.conf.py)
check_startup(settings)  # raises InsecureConfig (gunicorn exits) in production without a token key
app = create_app(settings)
app.extensions["relay"].start()
