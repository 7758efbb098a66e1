"""The built wheel, installed outside the checkout: it ships the sidecar and the dashboard (as sidecar.dashboard)
and nothing else, `sidecar dashboard` serves its page from the installed package against a real Redis, and the
commands that need a checkout say so.

The wheel is built offline from a copy of what ships (setuptools from the dev extra, no build isolation), and
installed with --no-deps into a fresh venv that borrows this venv's site-packages for its dependencies."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest
import requests

from tests.processes import REPO_ROOT, ManagedProcess, child_env

pytestmark = pytest.mark.slow


def run(argv: list[object], cwd: Path, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    shutil.copy(REPO_ROOT / "pyproject.toml", src)
    for folder in ("sidecar", "dashboard"):
        shutil.copytree(REPO_ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = src / "dist"
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out, "."], src)
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = out.glob("celery_realtime_sidecar-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel: Path) -> Path:
    """A fresh venv (outside the checkout) with the wheel installed; dependencies from this venv's site-packages."""
    root = tmp_path_factory.mktemp("venv")
    made = run([sys.executable, "-m", "venv", "--without-pip", root / "v"], root)
    assert made.returncode == 0, made.stderr
    python = root / "v" / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).stdout.strip())
    # A path line: the .pth files in that directory (the editable install of the checkout) are not run.
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", wheel], root)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return root / "v"


def test_the_wheel_ships_every_module_of_sidecar_and_dashboard_and_no_other_top_level_package(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"sidecar/{p.relative_to(REPO_ROOT / 'sidecar').as_posix()}" for p in (REPO_ROOT / "sidecar").rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".js", ".html", ".css")}
    expected |= {f"sidecar/dashboard/{p.name}" for p in (REPO_ROOT / "dashboard").glob("*.py")}
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {missing}: add the package to [tool.setuptools] packages in pyproject.toml"
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"sidecar"}, tops  # no top-level tasks, dashboard, bench or tests to shadow users' modules


def test_an_installed_sidecar_dashboard_serves_its_page_against_a_real_redis(venv, tmp_path, redis_server, free_port):
    where = run([venv / "bin" / "python", "-c", "import sidecar.dashboard.app, sidecar; print(sidecar.__file__)"],
                tmp_path, env=child_env(redis_server.url, {}))  # fmt: skip
    assert where.returncode == 0, where.stderr
    assert str(venv) in where.stdout  # the wheel's code, not the checkout's
    port = free_port()
    argv = [str(venv / "bin" / "sidecar"), "dashboard", "--port", str(port)]
    dash = ManagedProcess("dashboard", argv, child_env(redis_server.url, {}), tmp_path / "dashboard.log", cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert dash.running, dash.log_tail()
            try:
                page = requests.get(f"http://127.0.0.1:{port}/app", timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, dash.log_tail()
                time.sleep(0.3)
        assert page.status_code == 200 and "sidecar dashboard" in page.text
    finally:
        dash.stop()
    assert "Traceback" not in dash.log_text(), dash.log_tail()


def test_installed_commands_that_need_a_checkout_say_so(venv, tmp_path) -> None:
    sidecar = venv / "bin" / "sidecar"
    helped = run([sidecar, "dashboard", "--help"], tmp_path)
    assert helped.returncode == 0 and "default: 5006" in helped.stdout
    bench = run([sidecar, "bench"], tmp_path)
    assert bench.returncode == 2 and "not installed with the package" in bench.stderr, bench.stderr
    demo = run([sidecar, "demo", "--no-dashboard"], tmp_path, timeout=60)
    assert demo.returncode == 2 and "from a checkout" in demo.stdout, demo.stdout + demo.stderr
