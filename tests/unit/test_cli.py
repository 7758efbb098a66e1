"""`sidecar --help` and each command's help: every option says its default and its environment variable."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.cli import build_parser, port_free, port_taken

REPO = Path(__file__).resolve().parents[2]


def commands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("command", sorted(commands()))
def test_every_option_of_a_command_says_its_default_and_environment_variable(command: str) -> None:
    parser = commands()[command]
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    for action in options:
        text = action.help or ""
        assert "default:" in text, f"sidecar {command} {action.option_strings[0]}: no default in {text!r}"
        assert "env SIDECAR_" in text or "no environment variable" in text, (
            f"sidecar {command} {action.option_strings[0]}: no environment variable in {text!r}"
        )


def test_the_help_shows_the_settings_defaults_and_points_to_the_settings_reference(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 8000; env SIDECAR_PORT)" in text and "(default: 127.0.0.1; env SIDECAR_HOST)" in text
    assert "docs/settings.md" in text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert all(command in text for command in ("serve", "demo", "dashboard", "bench")) and "docs/settings.md" in text


def test_demo_leaves_the_port_to_the_environment_unless_given() -> None:
    assert build_parser().parse_args(["demo"]).port is None  # so SIDECAR_PORT applies (Settings.from_env)
    assert build_parser().parse_args(["demo", "--port", "8001"]).port == 8001


def test_a_busy_port_is_seen_and_the_message_says_how_to_pick_another() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not port_free("127.0.0.1", port)
    message = port_taken("dashboard", "127.0.0.1", port, "make demo DASHBOARD_PORT={}")
    assert f"127.0.0.1:{port} is in use" in message and f"make demo DASHBOARD_PORT={port + 1}" in message



@pytest.mark.parametrize("argv", [["serve"], ["serve", "--front", "asgi"], ["demo"]])
def test_a_bad_setting_stops_the_command_with_one_line_naming_it(argv: list[str]) -> None:
    env = {**os.environ, "SIDECAR_PORT": "eighty"}
    done = subprocess.run([sys.executable, "-m", "sidecar", *argv], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == "sidecar: SIDECAR_PORT: cannot read 'eighty' as int\n"
