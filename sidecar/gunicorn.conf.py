# gunicorn -c sidecar/gunicorn.conf.py   (REDIS_URL and SIDECAR_* in the environment)
import os

wsgi_app = "sidecar.wsgi:app"
worker_class = "gevent"  # one greenlet per connection; the worker patches before loading the app
workers = int(os.environ.get("SIDECAR_WORKERS", "1"))
worker_connections = int(os.environ.get("SIDECAR_WORKER_CONNECTIONS", "10000"))  # default 1000 is too few
bind = f"{os.environ.get('SIDECAR_HOST', '0.0.0.0')}:{os.environ.get('SIDECAR_PORT', '8000')}"
timeout = 30
graceful_timeout = 5
keepalive = 75
control_socket_disable = True
accesslog = None
