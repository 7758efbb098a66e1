"""SIDECAR_LOG_LEVEL: read in any case, INFO by default, and a bad value is refused naming the setting and the
levels it may be."""

from __future__ import annotations

import pytest

from sidecar.config import Settings


@pytest.mark.parametrize(
    ("raw", "level"), [("debug", "DEBUG"), ("Info", "INFO"), ("WARNING", "WARNING"), ("error", "ERROR"), ("", "INFO")]
)
def test_the_level_is_read_in_any_case(raw: str, level: str) -> None:
    assert Settings.from_env({"SIDECAR_LOG_LEVEL": raw}).log_level == level


def test_the_default_is_info() -> None:
    assert Settings.from_env({}).log_level == "INFO"


@pytest.mark.parametrize("raw", ["loud", "warn", "CRITICAL", "10", " debug"])
def test_a_bad_level_is_refused_naming_the_setting_and_the_levels(raw: str) -> None:
    with pytest.raises(ValueError) as refused:
        Settings.from_env({"SIDECAR_LOG_LEVEL": raw})
    assert str(refused.value) == f"SIDECAR_LOG_LEVEL: {raw!r} is not one of DEBUG, INFO, WARNING, ERROR (any case)"


def test_settings_made_in_code_are_checked_as_the_environment_is() -> None:
    assert Settings(log_level="debug").log_level == "DEBUG"
    assert Settings().replace(log_level="warning").log_level == "WARNING"
    with pytest.raises(ValueError, match="SIDECAR_LOG_LEVEL"):
        Settings().replace(log_level="verbose")
