"""The Dockerfile, .dockerignore and docker-compose.yml hold what ops rely on (Docker does not run here, so the
files are read, not built)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments left out."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_image_runs_as_a_user_that_is_not_root() -> None:
    users = [args for word, args in instructions() if word == "USER"]
    assert users, "the Dockerfile has no USER: the container runs as root"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_the_image_checks_its_health_on_healthz() -> None:
    checks = [args for word, args in instructions() if word == "HEALTHCHECK"]
    assert len(checks) == 1 and "/healthz" in checks[0] and " CMD " in f" {checks[0]} "


def test_the_image_runs_gunicorn_with_the_shipped_config_by_default() -> None:
    cmds = [args for word, args in instructions() if word == "CMD"]
    assert json.loads(cmds[-1]) == ["gunicorn", "-c", "sidecar/gunicorn.conf.py"]
    copied = [shlex.split(args)[0] for word, args in instructions() if word == "COPY"]
    assert all((ROOT / src).exists() for src in copied), copied
    assert "sidecar/" in copied


def test_dockerignore_keeps_the_venv_and_demo_state_out_of_the_build_context() -> None:
    patterns = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".sidecar", ".git"} <= patterns


def test_compose_runs_the_image_default_for_the_sidecar_and_keeps_the_http_check_off_the_worker() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) >= {"redis", "worker", "sidecar", "dashboard"}
    assert "command" not in services["sidecar"], "the sidecar service should run the image's gunicorn command"
    assert services["sidecar"]["ports"] == ["8000:8000"]
    assert services["worker"]["healthcheck"] == {"disable": True}
    assert "5006" in " ".join(services["dashboard"]["healthcheck"]["test"])
    assert services["redis"]["command"][-2:] == ["--appendonly", "yes"]
