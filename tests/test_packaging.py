"""Packaging: a small core, the rest as extras that degrade with one line when missing; a license."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CORE = {"torch", "transformers", "peft", "safetensors", "numpy", "tqdm", "pyyaml", "ninja"}


def name_of(requirement: str) -> str:
    return re.split(r"[\s<>=!;\[]", requirement, maxsplit=1)[0].lower()


def test_the_core_installs_only_what_the_patcher_needs():
    assert {name_of(r) for r in PYPROJECT["project"]["dependencies"]} == CORE


@pytest.mark.parametrize("extra, needs", [("triton", "triton"), ("plots", "matplotlib"), ("ray", "ray"),
                                          ("demo", "gguf"), ("demo", "matplotlib")])
def test_each_extra_brings_its_package(extra, needs):
    assert needs in {name_of(r) for r in PYPROJECT["project"]["optional-dependencies"][extra]}


def test_all_is_every_extra_but_test():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert extras["all"] == [f"mscp[{','.join(sorted(set(extras) - {'all', 'test'}, key=list(extras).index))}]"]


def test_the_license_is_an_spdx_string_and_its_text_ships():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_every_package_is_listed_for_a_wheel():
    """setup.py lists packages by hand: a new one (mscp.executors) must be there to ship."""
    listed = re.findall(r'"(mscp[\w.]*)"', (ROOT / "setup.py").read_text().split("package_dir")[0])
    on_disk = {".".join(p.relative_to(ROOT).parent.parts) for p in (ROOT / "mscp").rglob("__init__.py")}
    assert on_disk <= set(listed)


@pytest.fixture
def no_matplotlib(monkeypatch):
    from mscp.continual import figures

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setattr(figures, "_said", False)


def test_without_matplotlib_figures_are_skipped_with_one_line(no_matplotlib, capsys, tmp_path):
    from mscp.continual.analytics import write_figures
    from mscp.harness.continual_eval import plot_asr
    from mscp.harness.demo import plot_figures
    from mscp.harness.pareto import plot_pareto

    assert plot_figures({}, tmp_path) == []
    assert write_figures({}, tmp_path) == []
    assert plot_asr({}, tmp_path / "a.png") is None and plot_pareto({}, tmp_path / "p.png") is None
    assert capsys.readouterr().err == ("mscp: note: figures skipped: matplotlib is not installed "
                                       "(pip install 'mscp[plots]')\n")
    assert not list(tmp_path.iterdir())


def test_without_ray_the_ray_executor_is_one_line_before_any_work(monkeypatch, llama_trio, tmp_path, capsys):
    from mscp.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    argv = ["patch", "--base", str(llama_trio["base"]), "--aligned", str(llama_trio["aligned"]), "--adapter",
            str(llama_trio["adapter"]), "--out-dir", str(tmp_path / "outs"), "--executor", "ray", "--quiet"]
    assert main(argv) == 2
    assert capsys.readouterr().err == "mscp: error: --executor ray needs Ray: pip install 'mscp[ray]'\n"
    assert not (tmp_path / "outs").exists()


# -- the repo root: `mscp` is the only name it makes importable -------------------------------------
# setup.py is the build script the layout asks for; nothing imports it.
BUILD_SCRIPTS = {"setup.py"}


def test_the_repo_root_holds_no_package_or_module_but_mscp():
    """`python -m pytest`, Ray workers and `python -m mscp` put the repo root first on sys.path: a
    top-level `kernels/` there once shadowed the `kernels` package transformers imports."""
    importable = sorted(p.name for p in ROOT.iterdir() if not p.name.startswith(".")
                        and ((p.is_dir() and (p / "__init__.py").is_file())
                             or (p.is_file() and p.suffix in (".py", ".so", ".pyd") and p.name not in BUILD_SCRIPTS)))
    assert importable == ["mscp"]


def test_no_installed_package_is_shadowed_from_the_repo_root():
    """Every top-level name of every installed distribution, imported with the repo root first on
    sys.path, comes from site-packages (a folder without __init__.py at the root would otherwise
    still win over a namespace package of the same name)."""
    import subprocess

    code = ("import importlib.metadata as md, importlib.util, sys, pathlib\n"
            f"root = pathlib.Path({str(ROOT)!r})\n"
            "sys.path.insert(0, str(root))\n"
            "names = {n for ns in md.packages_distributions().values() for n in ns} | "
            "set(md.packages_distributions())\n"
            "bad = []\n"
            "for name in sorted(n for n in names if n.isidentifier() and n != 'mscp'):\n"
            "    try:\n"
            "        spec = importlib.util.find_spec(name)\n"
            "    except Exception:\n"
            "        continue\n"
            "    places = [spec.origin] if spec and spec.origin else list(spec.submodule_search_locations or []) if spec else []\n"
            "    if any(p and pathlib.Path(p).resolve().is_relative_to(root) and '/.venv' not in p for p in places):\n"
            "        bad.append(name)\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


# -- type hints of the public API (py.typed ships) --------------------------------------------------
def _public_functions():
    import mscp
    from mscp.core.pipeline import PatchResult

    return [getattr(mscp, name) for name in ("patch", "patch_many", "patch_peft_model", "fast_project")] + \
        [PatchResult.save]


def test_every_public_entry_point_is_fully_annotated_and_its_hints_resolve():
    import inspect
    import typing

    for function in _public_functions():
        hints = typing.get_type_hints(function)  # NameError/TypeError here: a hint that does not resolve
        parameters = [p for p in inspect.signature(function).parameters if p != "self"]
        assert set(parameters) <= set(hints), (function.__qualname__, sorted(set(parameters) - set(hints)))
        assert "return" in hints, function.__qualname__


@pytest.mark.parametrize("field, choices", [("score", "SCORES"), ("criterion", "CRITERIA"), ("projector", "PROJECTORS"),
                                           ("dtype", "DTYPES"), ("backend", "BACKEND_CHOICES"),
                                           ("finetuned_pass", "FINETUNED_PASSES")])
def test_each_string_option_is_a_literal_of_the_choices_the_checks_use(field, choices):
    import dataclasses
    import typing

    from mscp import MSCPError
    from mscp.core import config
    from mscp.core.config import PatchConfig

    literal = typing.get_type_hints(PatchConfig)[field]
    assert typing.get_origin(literal) is typing.Literal
    allowed = getattr(config, choices)
    assert typing.get_args(literal) == allowed
    assert next(f for f in dataclasses.fields(PatchConfig) if f.name == field).metadata["choices"] == allowed  # argparse
    with pytest.raises(MSCPError, match=f"^{field} must be one of {re.escape(', '.join(allowed))}, got 'nope'$"):
        PatchConfig(**{field: "nope"})


def test_the_literal_hints_give_string_options_on_the_command_line():
    """mscp/cli/options.py takes any hint but bool, int and float as str: a Literal stays a str option."""
    import argparse

    from mscp.cli.options import add_config_options

    parser = argparse.ArgumentParser()
    add_config_options(parser)
    actions = {a.dest: a for a in parser._actions}
    for field in ("score", "criterion", "projector", "dtype", "backend", "finetuned_pass"):
        assert actions[field].type is str and actions[field].choices, field
    args = parser.parse_args(["--score", "wanda", "--backend", "torch", "--q", "0.5"])
    assert (args.score, args.backend, args.q) == ("wanda", "torch", 0.5)
