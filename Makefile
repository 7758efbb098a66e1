VENV ?= .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
# make demo PORT=8001 DASHBOARD_PORT=5007; unset: SIDECAR_PORT from the environment, else 8000 and 5006.
PORT ?=
DASHBOARD_PORT ?=

.PHONY: install browser test demo notebook bench lint clean

# One stamp per use, each installing only its extras (docs/settings.md, README "Install"):
#   .installed  test and lint (CI runs `make .venv/.installed`): dev + dashboard + asgi
#   .demo       make demo: the dashboard only
#   .notebook   make notebook: the dashboard and Jupyter
#   .bench      make bench: the benchmark tools
install: $(VENV)/.installed

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install -e '.[dev,dashboard,asgi]'
	touch $@

$(VENV)/.demo: pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install -e '.[dashboard]'
	touch $@

$(VENV)/.notebook: pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install -e '.[notebook]'
	touch $@

$(VENV)/.bench: pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install -e '.[bench,asgi]'
	touch $@

# Browser tests drive Debian's Chromium (Playwright cannot download its own browser here); the proxy tests run
# Debian's nginx with deploy/nginx/nginx.conf.
browser:
	@if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/sbin/nginx ]; } && [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium nginx; \
	fi

test: $(VENV)/.installed browser
	$(VENV)/bin/pytest -q

demo: $(VENV)/.demo
	$(VENV)/bin/sidecar demo $(if $(PORT),--port $(PORT)) $(if $(DASHBOARD_PORT),--dashboard-port $(DASHBOARD_PORT))

# While `make demo` runs: the notebook finds the demo's Redis in .sidecar/redis.url.
notebook: $(VENV)/.notebook
	$(VENV)/bin/jupyter lab dashboard/notebook.ipynb

bench: $(VENV)/.bench
	$(VENV)/bin/python -m bench

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy sidecar

# .sidecar/ is the demo's state: the embedded Redis (its AOF: channels, stats, the throttle policy) and logs.
clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache .hypothesis .sidecar
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
