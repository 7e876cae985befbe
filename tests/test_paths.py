"""One cache root, chosen in one function and made on demand (mscp.paths)."""
from __future__ import annotations

from pathlib import Path

import pytest

from mscp.paths import cache_dir, cache_root


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("MSCP_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_the_default_is_under_home(clean_env):
    assert cache_root() == clean_env / "home" / ".cache" / "mscp"


def test_xdg_cache_home_moves_it(clean_env, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(clean_env / "xdg"))
    assert cache_root() == clean_env / "xdg" / "mscp"


def test_a_relative_xdg_cache_home_is_ignored_as_the_spec_says(clean_env, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")
    assert cache_root() == clean_env / "home" / ".cache" / "mscp"


def test_mscp_cache_wins_over_both(clean_env, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(clean_env / "xdg"))
    monkeypatch.setenv("MSCP_CACHE", str(clean_env / "mine"))
    assert cache_root() == clean_env / "mine"


def test_an_explicit_root_wins_over_the_environment(clean_env, monkeypatch):
    monkeypatch.setenv("MSCP_CACHE", str(clean_env / "mine"))
    assert cache_root(clean_env / "given") == clean_env / "given"


def test_cache_dir_makes_every_missing_parent(clean_env):
    """A machine that has never seen mscp has no ~/.cache at all."""
    assert not (clean_env / "home").exists()
    made = cache_dir("organism", "abc")
    assert made == clean_env / "home" / ".cache" / "mscp" / "organism" / "abc" and made.is_dir()


def test_the_cxx_build_lives_under_the_cache_root(clean_env, monkeypatch):
    from mscp.kernels import _ext

    monkeypatch.delenv("MSCP_EXT_DIR", raising=False)
    monkeypatch.setenv("MSCP_CACHE", str(clean_env / "mine"))
    assert _ext.build_dir(False).parent == clean_env / "mine" / "ext"


def test_the_help_names_the_cache_root(capsys):
    from mscp.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert "MSCP_CACHE" in capsys.readouterr().out


def test_no_module_writes_its_own_cache_path():
    """Every cache path comes from mscp.paths: no module spells out ~/.cache."""
    root = Path(__file__).resolve().parents[1] / "mscp"
    spelled = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                     if p.name != "paths.py" and ('".cache"' in p.read_text() or "'.cache'" in p.read_text()))
    assert spelled == []
