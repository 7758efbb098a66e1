"""The docker-compose stacks, checked without Docker (not runnable here): every command names a real entry point,
every environment name is read by something, and the production stack has what a fleet needs."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from sidecar.config import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
CELERY_APP = ROOT / "tasks" / "celery_app.py"
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.prod.yml", "docker-compose.cluster.yml"]


def services(name: str) -> dict[str, dict]:
    return yaml.safe_load((ROOT / name).read_text())["services"]


def env_names_read() -> set[str]:
    """SIDECAR_* names the code reads: every Settings field, plus those read from the environment elsewhere."""
    names = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)} | {"REDIS_URL"}
    for path in [*ROOT.glob("sidecar/**/*.py"), *ROOT.glob("dashboard/*.py")]:
        names |= set(re.findall(r"environ(?:\.get\(|\[)\s*[\"'](SIDECAR_[A-Z0-9_]+)", path.read_text()))
    return names


def console_scripts() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


@pytest.mark.parametrize("compose", COMPOSE_FILES)
def test_every_command_names_a_real_entry_point(compose: str) -> None:
    for name, service in services(compose).items():
        command = service.get("command")
        assert command is None or all(isinstance(arg, str) for arg in command), (name, command)  # argv: flat
        if not command or "image" in service and not service.get("build"):
            continue  # a stock image (redis, nginx): its own entry point
        program = command[0]
        if program == "sidecar":
            assert "sidecar" in console_scripts()
            assert command[1] in ("serve", "dashboard", "demo"), (name, command)
        elif program == "gunicorn":
            assert (ROOT / command[command.index("-c") + 1]).is_file(), (name, command)
        elif program == "celery":
            module = command[command.index("-A") + 1].split(":")[0]
            assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), (name, command)
        else:
            pytest.fail(f"{compose}: {name} runs {program!r}, which is not one of the project's entry points")


@pytest.mark.parametrize("compose", COMPOSE_FILES)
def test_every_environment_name_is_read_by_the_code(compose: str) -> None:
    known = env_names_read()
    for name, service in services(compose).items():
        for var in service.get("environment", {}):
            if var.startswith(ENV_PREFIX) or var == "REDIS_URL":
                assert var in known, f"{compose}: {name} sets {var}, which nothing reads"
            elif var.startswith("CELERY_"):
                assert var in CELERY_APP.read_text(), (
                    f"{compose}: {name} sets {var}; tasks/celery_app.py never reads it"
                )


def test_the_production_stack_runs_three_gunicorn_replicas_behind_nginx_with_healthchecks() -> None:
    stack = services("docker-compose.prod.yml")
    replicas = {n: s for n, s in stack.items() if n.startswith("sidecar-")}
    assert len(replicas) == 3
    for name, service in replicas.items():
        assert service["command"][0] == "gunicorn", name
        assert "SIDECAR_DEV" not in service["environment"], name  # production mode: auth required
        assert "/healthz" in " ".join(service["healthcheck"]["test"]), name
        assert service["restart"] == "unless-stopped", name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
    assert "--appendonly" in stack["redis"]["command"]
    proxy = stack["nginx"]
    assert {d["condition"] for d in proxy["depends_on"].values()} == {"service_healthy"}
    assert set(proxy["depends_on"]) == set(replicas)
    mounted = proxy["volumes"][0].split(":")[0]
    conf = (ROOT / mounted / "nginx.conf").read_text()
    assert all(f"server {n}:8000" in conf for n in replicas)  # the shipped upstream names these services
    assert all("restart" in s for s in stack.values())


def test_the_cluster_stack_runs_the_relay_on_a_3_plus_3_redis_cluster_and_celery_on_a_plain_redis() -> None:
    stack = services("docker-compose.cluster.yml")
    nodes = {n: s for n, s in stack.items() if re.fullmatch(r"redis-\d+", n)}
    assert len(nodes) == 6
    conf = next(ROOT / v.split(":")[0] for v in nodes["redis-1"]["volumes"] if v.startswith("./deploy/"))
    directives = dict(
        line.split(None, 1) for line in (conf / "cluster.conf").read_text().splitlines() if line[:1].isalpha()
    )
    assert directives["cluster-enabled"] == "yes" and directives["appendonly"] == "yes"
    for name, node in nodes.items():
        assert node["command"][:2] == ["redis-server", "/etc/redis/cluster.conf"], name
        assert node["command"][node["command"].index("--cluster-announce-hostname") + 1] == name
        assert "redis-cli" in node["healthcheck"]["test"] and node["restart"] == "unless-stopped", name
    init = stack["redis-cluster-init"]
    script = init["command"][-1]
    assert "--cluster-replicas 1" in script and all(n in script for n in nodes)
    assert {d["condition"] for d in init["depends_on"].values()} == {"service_healthy"}
    assert set(init["depends_on"]) == set(nodes)
    replicas = {n: s for n, s in stack.items() if n.startswith("sidecar-")}
    assert len(replicas) == 3
    for name, service in [*replicas.items(), ("worker", stack["worker"]), ("dashboard", stack["dashboard"])]:
        url = service["environment"]["REDIS_URL"]
        assert url.startswith("redis+cluster://"), name
        assert {seed.split(":")[0] for seed in url.split("://")[1].split(",")} <= set(nodes), name
        assert service["depends_on"]["redis-cluster-init"]["condition"] == "service_completed_successfully", name
        assert service["restart"] == "unless-stopped", name
    for name, service in replicas.items():
        assert service["command"][0] == "gunicorn" and "SIDECAR_DEV" not in service["environment"], name
        assert "/healthz" in " ".join(service["healthcheck"]["test"]), name
    broker = stack["worker"]["environment"]["CELERY_BROKER_URL"]
    assert broker.startswith("redis://") and broker.split("//")[1].split(":")[0] == "broker"  # never the cluster
    assert stack["worker"]["depends_on"]["broker"]["condition"] == "service_healthy"
    assert "--appendonly" in stack["broker"]["command"]
    assert set(stack["nginx"]["depends_on"]) == set(replicas)
    assert all("restart" in s for s in stack.values())
