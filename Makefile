VENV ?= .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)

.PHONY: install browser test demo bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -e '.[dev,dashboard,asgi]'
	touch $@

# Browser tests drive Debian's Chromium (Playwright cannot download its own browser here); the proxy tests run
# Debian's nginx with deploy/nginx/nginx.conf.
browser:
	@if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/sbin/nginx ]; } && [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium nginx; \
	fi

test: $(VENV)/.installed browser
	$(VENV)/bin/pytest -q

demo: $(VENV)/.installed
	$(VENV)/bin/sidecar demo

bench: $(VENV)/.installed
	$(VENV)/bin/python -m bench

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy sidecar

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
