"""The README's commands on a machine that has never seen mscp: no ~/.cache, no cache root, nothing
built. `mscp demo --smoke` runs every stage of the demo (organism build, patch, baselines, answers,
evaluation, table, figures) on a tiny random base; the real SmolLM2 demo differs only in sizes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mscp.harness.demo import METHODS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_demo_runs_from_an_empty_home(tmp_path):
    """About 30 s on the 2-core CPU machine, the C++ build included."""
    home = tmp_path / "home"  # does not exist: nothing may assume ~/.cache is there
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MSCP_", "XDG_"))}
    env.update(HOME=str(home), PYTHONUNBUFFERED="1")
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "mscp", "demo", "--smoke", "--out", str(out), "--quiet"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    table = (out / "table.txt").read_text()
    assert all(m in table for m in METHODS) and table in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(METHODS) <= set(summary["methods"]) and 0 < summary["mscp"]["edit_fraction"] < 1
    assert summary["figures"] == ["layer_curves.png", "neurons.png"]
    assert all((out / f).stat().st_size > 1000 for f in summary["figures"])

    root = home / ".cache" / "mscp"  # the default root, made on demand, holds every cache
    assert sorted(p.name for p in root.iterdir()) == ["ext", "judges", "organism", "responses", "smoke-base"]
    assert list((root / "organism").iterdir()) and list((root / "judges").iterdir())
    assert not (home / ".cache" / "mscp_ext").exists()  # the C++ build's old place, outside the root
