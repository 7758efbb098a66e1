"""Where the dashboard and the notebook find the demo's Redis when REDIS_URL is unset: the URL `sidecar demo`
records in its data dir, looked for from the working directory up (Jupyter starts the notebook in dashboard/)."""

from __future__ import annotations

from dashboard.feed import DashboardConfig
from sidecar.embedded import URL_FILE, recorded_url


def test_a_relative_data_dir_is_found_from_a_subfolder_of_the_checkout(tmp_path, monkeypatch) -> None:
    (tmp_path / ".sidecar").mkdir()
    (tmp_path / ".sidecar" / URL_FILE).write_text("redis://127.0.0.1:41234/0\n")
    (tmp_path / "dashboard").mkdir()
    monkeypatch.chdir(tmp_path / "dashboard")
    assert recorded_url(".sidecar") == "redis://127.0.0.1:41234/0"
    assert DashboardConfig.from_env({}).redis_url == "redis://127.0.0.1:41234/0"


def test_redis_url_wins_and_without_a_recorded_url_the_default_redis_is_used(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert recorded_url(".sidecar") is None
    assert DashboardConfig.from_env({"SIDECAR_DATA_DIR": str(tmp_path)}).redis_url == "redis://127.0.0.1:6379/0"
    (tmp_path / URL_FILE).write_text("redis://127.0.0.1:41234/0\n")
    assert DashboardConfig.from_env({"SIDECAR_DATA_DIR": str(tmp_path)}).redis_url == "redis://127.0.0.1:41234/0"
    environ = {"SIDECAR_DATA_DIR": str(tmp_path), "REDIS_URL": "redis://elsewhere:6379/0"}
    assert DashboardConfig.from_env(environ).redis_url == "redis://elsewhere:6379/0"
