"""docs/settings.md lists every field of Settings with its environment name, type and actual default, and names no
setting that is gone: a new field without a row fails here, with the row to add."""

from __future__ import annotations

import re
from dataclasses import MISSING, Field, fields
from pathlib import Path

from sidecar.config import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "settings.md"
TYPES = {"int": "int", "float": "float", "bool": "bool", "str": "string", "str | None": "string"}
OUTSIDE_HEADING = "## Read outside `Settings`"


def env_name(field: Field) -> str:
    return "REDIS_URL" if field.name == "redis_url" else ENV_PREFIX + field.name.upper()


def default_text(value: object) -> str:
    """A default as this page writes it: the environment value that means it."""
    if value is None:
        return "unset"
    if value == "":
        return "empty"
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def rows(text: str) -> dict[str, list[str]]:
    """Table rows whose first cell is one `SIDECAR_*`/`REDIS_URL` name: name -> the cells after it."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else []
        if cells and (match := re.fullmatch(r"`((?:SIDECAR_|REDIS_URL)[A-Z0-9_]*)`", cells[0])):
            assert match[1] not in out, f"docs/settings.md has two rows for {match[1]}"
            out[match[1]] = cells[1:]
    return out


def first_value(cell: str) -> str:
    code = re.match(r"`([^`]*)`", cell)
    return code[1] if code else cell.split()[0]


def default_of(field: Field) -> object:
    return field.default_factory() if field.default is MISSING else field.default  # type: ignore[misc]


def row_to_add(field: Field) -> str:
    shown = default_text(default_of(field))
    shown = shown if shown in ("unset", "empty") else f"`{shown}`"
    kind = TYPES.get(str(field.type), str(field.type))
    return f"| `{env_name(field)}` | {kind} | {shown} | <range; what it does> | <what it trades> |"


def test_every_setting_has_a_row_with_its_type_and_actual_default() -> None:
    text = DOC.read_text()
    settings_rows = rows(text.split(OUTSIDE_HEADING)[0])
    problems = []
    for field in fields(Settings):
        name, want = env_name(field), row_to_add(field)
        cells = settings_rows.get(name)
        if cells is None:
            problems.append(f"no row for Settings.{field.name}; add one to the table of its section:\n  {want}")
            continue
        if len(cells) != 4 or not all(cells):
            problems.append(f"the row of {name} needs 5 filled cells (setting, type, default, meaning, trade)")
            continue
        kind, default = TYPES.get(str(field.type), str(field.type)), default_text(default_of(field))
        if cells[0] != kind:
            problems.append(f"{name}: the type is {kind}, the row says {cells[0]!r}")
        if first_value(cells[1]) != default:
            problems.append(f"{name}: the default is {default}, the row says {cells[1]!r}; make it:\n  {want}")
    assert not problems, "docs/settings.md:\n" + "\n".join(problems)


def test_no_row_names_a_setting_that_is_gone() -> None:
    text = DOC.read_text()
    known = {env_name(f) for f in fields(Settings)}
    stale = sorted(set(rows(text.split(OUTSIDE_HEADING)[0])) - known)
    assert not stale, f"docs/settings.md has rows for {stale}, which are not Settings fields: remove or rename them"


def test_the_settings_read_outside_settings_are_still_read_where_the_page_says() -> None:
    text = DOC.read_text()
    assert OUTSIDE_HEADING in text
    known = {env_name(f) for f in fields(Settings)}
    for name, cells in rows(text.split(OUTSIDE_HEADING)[1]).items():
        assert name not in known, f"{name} is a Settings field now: move its row into the table of its section"
        source = (ROOT / cells[0]).read_text()
        assert name in source, f"{cells[0]} no longer reads {name}: remove its row from docs/settings.md"


def test_every_setting_named_in_the_docs_exists() -> None:
    text = DOC.read_text()
    known = {env_name(f) for f in fields(Settings)} | set(rows(text.split(OUTSIDE_HEADING)[1]))
    known |= {ENV_PREFIX + f.name.upper() for f in fields(Settings)}  # SIDECAR_REDIS_URL is read too
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        named = set(re.findall(r"\b(?:SIDECAR|REDIS)_[A-Z][A-Z0-9_]*", doc.read_text()))
        unknown = sorted(named - known)
        assert not unknown, f"{doc.relative_to(ROOT)} names {unknown}, which docs/settings.md does not list"
