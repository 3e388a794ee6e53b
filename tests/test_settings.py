"""The process environment: every TL_* variable the code names is a field of one settings object, and the
README's table lists exactly those (tasks/project/settings.py)."""

from __future__ import annotations

import re

import pytest
from helpers import ROOT

from tasks.project.settings import Settings, settings

CODE = [f for top in ("tasks", "flows") for f in (ROOT / top).rglob("*.py")] + [ROOT / "prefect.yaml"]


def _env_names(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w$])TL_[A-Z][A-Z_]*[A-Z]", text))


def test_every_tl_variable_in_the_code_is_a_settings_field():
    fields = {f"TL_{name.upper()}" for name in Settings.model_fields}
    named = set().union(*(_env_names(f.read_text()) for f in CODE))
    assert named - fields == set(), f"TL_* variables the code uses outside tasks/project/settings.py: {named - fields}"


def test_the_readme_table_lists_every_field():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| variable | what it does |") :]
    table = table[: table.index("\n\n")]
    assert _env_names(table) == {f"TL_{name.upper()}" for name in Settings.model_fields}


def test_settings_are_read_when_asked_and_bad_values_name_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("TL_VERBOSE", "yes")
    monkeypatch.setenv("TL_CACHE_DIR", str(tmp_path))
    assert settings().verbose is True and settings().cache_dir == tmp_path
    monkeypatch.setenv("TL_VERBOSE", "0")
    assert settings().verbose is False  # read now, not at import
    monkeypatch.setenv("TL_VERBOSE", "maybe")
    with pytest.raises(ValueError, match="TL_VERBOSE='maybe'"):
        settings()
