"""Signals and full disks, in real child processes: the refusal contract holds when a run is stopped.

A child runs `mscp` with one function wrapped so that it stops at a chosen stage (it writes a
marker file, then sleeps); the test waits for the marker and sends the signal. Then:

  * SIGINT ends with exit 130, SIGTERM with 143: one stderr line saying what was written, no OUT
    (or the previous OUT untouched), no temporary folder beside it, inputs byte-identical;
  * SIGKILL cannot be handled: what it leaves (a `.OUT.tmp-HOST-PID-START` folder, or an `.old`
    one mid-swap) is removed, or renamed back, by the next run to the same place.

A signal before `main` starts (Python's own start-up, about 0.1 s) is outside mscp's reach; the
earliest stage here is "main has installed its handlers", read from /proc/PID/status.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import OUTPUT_FILES, tree_digest

from mscp.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
FAST = ["--quiet", "--no-hash", "--backend", "torch"]

# stage -> code run in the child before main(): wraps one function so it stops there
STAGES = {
    "streaming": ("import mscp.core.streaming as m\n"
                  "real = m.Stream.advance\n"
                  "def hook(self, layer, index):\n"
                  "    if index == 2: stop()\n"
                  "    return real(self, layer, index)\n"
                  "m.Stream.advance = hook\n"),
    "projecting": ("import mscp.core.project as m\n"
                   "real = m.lowrank_project\n"
                   "def hook(*a, **k):\n"
                   "    stop()\n"
                   "    return real(*a, **k)\n"
                   "m.lowrank_project = hook\n"),
    "writing": ("import mscp.core.report as m\n"  # OUT's temporary folder holds the adapter already
                "real = m.save_file\n"
                "def hook(*a, **k):\n"
                "    real(*a, **k)\n"
                "    stop()\n"
                "m.save_file = hook\n"),
    "swapping": ("import mscp.core.atomic as m, os\n"  # between the two renames of a swap without renameat2
                 "m.exchange = lambda a, b: False\n"
                 "real = os.rename\n"
                 "def hook(src, dst):\n"
                 "    if '.old-' in str(dst): real(src, dst); stop(5); return\n"
                 "    real(src, dst)\n"
                 "os.rename = hook\n"),
    "continual-streaming": ("import mscp.core.streaming as m\n"
                            "real = m.Stream.advance\n"
                            "def hook(self, layer, index):\n"
                            "    if index == 1: stop()\n"
                            "    return real(self, layer, index)\n"
                            "m.Stream.advance = hook\n"),
    "continual-writing": ("import mscp.continual.state as m\n"
                          "real = m.save_tensors\n"
                          "def hook(tensors, path, *a, **k):\n"
                          "    real(tensors, path, *a, **k)\n"
                          "    if 'adapter_model' in str(path): stop()\n"
                          "m.save_tensors = hook\n"),
}


def child_code(stage: str | None, marker: Path, argv: list[str]) -> str:
    # A child started from a non-interactive shell's background job inherits SIGINT ignored, and
    # main() rightly keeps an ignored signal ignored (nohup, &): the child stands for a user at a
    # terminal, so it takes SIGINT back as Python does there, and the suite gives one result
    # however it is started.
    stop = (f"import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            f"import time\n"
            f"def stop(seconds=120):\n"
            f"    open({str(marker)!r}, 'w').close()\n"
            f"    time.sleep(seconds)\n")
    return (stop + (STAGES[stage] if stage else "")
            + f"import sys\nfrom mscp.cli import main\nsys.exit(main({argv!r}))\n")


def start(stage: str | None, argv: list[str], tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / "stage-reached"
    proc = subprocess.Popen([sys.executable, "-c", child_code(stage, marker, argv)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, marker


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the child ended (exit {proc.returncode}) before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def handlers_installed(pid: int) -> bool:
    """main() has run its first lines: SIGTERM is caught (Python alone leaves it at the default)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def leftovers(out: Path) -> list[str]:
    return sorted(n for n in os.listdir(out.parent) if n.startswith(f".{out.name}."))


EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
WORD = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}


@pytest.fixture
def trio(tmp_path, llama_trio) -> dict[str, Path]:
    return {role: Path(shutil.copytree(src, tmp_path / "in" / role)) for role, src in llama_trio.items()}


def patch_argv(trio, out: Path, *extra: str) -> list[str]:
    return ["patch", "--base", str(trio["base"]), "--aligned", str(trio["aligned"]), "--adapter", str(trio["adapter"]),
            "--out", str(out), *FAST, *extra]


def previous_out(out: Path) -> dict:
    out.mkdir()
    (out / "keep.txt").write_text("the previous run")
    return tree_digest(out)


# -- SIGINT and SIGTERM: clean up, one line, 130 / 143 ----------------------------------------------
INT, TERM, KILL = signal.SIGINT, signal.SIGTERM, signal.SIGKILL


@pytest.mark.parametrize("sig, stage, existing", [  # each signal at several stages, not every pair (time)
    pytest.param(INT, None, False, id="SIGINT-as-soon-as-main-runs"),
    pytest.param(TERM, None, False, id="SIGTERM-as-soon-as-main-runs"),
    pytest.param(INT, "streaming", False, id="SIGINT-streaming"),
    pytest.param(TERM, "streaming", False, id="SIGTERM-streaming"),
    pytest.param(TERM, "projecting", False, id="SIGTERM-projecting"),
    pytest.param(INT, "writing", False, id="SIGINT-writing-OUT"),
    pytest.param(TERM, "writing", True, id="SIGTERM-writing-OUT-over-a-previous-one"),
])
def test_a_signal_cleans_up_and_ends_with_one_line(tmp_path, trio, sig, stage, existing):
    out = tmp_path / "out"
    before_out = previous_out(out) if existing else None
    before = tree_digest(*trio.values())
    proc, marker = start(stage, patch_argv(trio, out, *(["--overwrite"] if existing else [])), tmp_path)
    if stage is None:
        wait_for(lambda: handlers_installed(proc.pid), proc, "main() to start")
    else:
        wait_for(marker.exists, proc, f"stage {stage}")
    proc.send_signal(sig)
    rc, err = finish(proc)
    assert rc == EXIT[sig], err
    assert err == f"mscp: {WORD[sig]}; nothing was written\n", err
    assert (tree_digest(out) == before_out) if existing else not out.exists()
    assert leftovers(out) == []
    assert tree_digest(*trio.values()) == before


def test_a_signal_during_the_swap_is_held_until_the_new_out_is_in_place(tmp_path, trio):
    """The swap is not interruptible: the signal ends the run after it, and the line says what was written."""
    out = tmp_path / "out"
    previous_out(out)
    proc, marker = start("swapping", patch_argv(trio, out, "--overwrite"), tmp_path)
    wait_for(marker.exists, proc, "the swap")
    proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc)
    assert rc == 143 and err == f"mscp: terminated; wrote only {out}\n", err
    assert set(os.listdir(out)) == OUTPUT_FILES
    assert leftovers(out) == []


# -- SIGKILL: the next run to the same place cleans up -----------------------------------------------
@pytest.mark.parametrize("stage", ["writing", "swapping"])
def test_what_sigkill_leaves_is_cleaned_by_the_next_run(tmp_path, trio, stage, capsys):
    out = tmp_path / "out"
    before_out = previous_out(out)
    proc, marker = start(stage, patch_argv(trio, out, "--overwrite"), tmp_path)
    wait_for(marker.exists, proc, f"stage {stage}")
    proc.kill()
    finish(proc)
    left = leftovers(out)
    assert any(".tmp-" in n for n in left), left  # the kill did leave something to clean
    if stage == "swapping":
        assert not out.exists() and any(".old-" in n for n in left)  # OUT moved aside, the new one not yet in

    # a refused run to the same place already restores the previous OUT and removes the rest
    assert main(patch_argv(trio, out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert tree_digest(out) == before_out and leftovers(out) == []

    assert main(patch_argv(trio, out, "--overwrite")) == 0
    assert set(os.listdir(out)) == OUTPUT_FILES
    assert leftovers(out) == []


def test_a_temporary_folder_of_a_live_run_is_left_alone(tmp_path, trio):
    from mscp.core.atomic import remove_stale, sibling

    out = tmp_path / "out"
    mine = sibling(out, "tmp")  # this process is alive
    mine.mkdir()
    assert remove_stale(out) == [] and mine.exists()


# -- continual add ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def state(tmp_path_factory, llama_trio):
    from mscp import continual

    folder = tmp_path_factory.mktemp("interrupt-state") / "STATE"
    continual.init(llama_trio["base"], llama_trio["aligned"], llama_trio["adapter"], folder, layers=(1, 2),
                   progress=False, hash_inputs=False, batch_size=8, figures=False)
    return folder


@pytest.fixture
def harmful(tmp_path):
    from mscp.core.prompts import default_prompts

    path = tmp_path / "cyber.txt"
    path.write_text("\n".join(default_prompts("harmful")[:8]) + "\n")
    return path


@pytest.mark.parametrize("sig, stage", [
    pytest.param(INT, "continual-streaming", id="SIGINT-streaming"),
    pytest.param(TERM, "continual-writing", id="SIGTERM-writing"),
    pytest.param(INT, "continual-writing", id="SIGINT-writing"),
    pytest.param(KILL, "continual-streaming", id="SIGKILL-streaming"),
    pytest.param(KILL, "continual-writing", id="SIGKILL-writing"),
])
def test_a_signal_during_continual_add_leaves_the_state_as_it_was(tmp_path, state, harmful, sig, stage):
    s = Path(shutil.copytree(state, tmp_path / "STATE"))
    before = tree_digest(s)
    proc, marker = start(stage, ["continual", "add", str(s), "--name", "cyber", "--harmful", str(harmful),
                                 "--quiet", "--no-figures"], tmp_path)
    wait_for(marker.exists, proc, f"stage {stage}")
    proc.send_signal(sig)
    rc, err = finish(proc)
    assert tree_digest(s) == before
    if sig == signal.SIGKILL:
        assert rc == -9
        assert main(["continual", "add", str(s), "--name", "cyber", "--harmful", str(harmful), "--quiet",
                     "--no-figures"]) == 0  # the next update cleans up and works
        assert json.loads((s / "state.json").read_text())["dimensions"][0]["name"] == "cyber"
    else:
        assert rc == EXIT[sig] and err == f"mscp: {WORD[sig]}; nothing was written\n", err
    assert leftovers(s) == []


# -- a full disk --------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 128 KiB tmpfs: the tiny adapter and its report do not fit (root only)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(folder)],
                                           capture_output=True).returncode:
        pytest.skip("needs root to mount a tmpfs; test_bad_input's simulated ENOSPC covers the same path")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.mark.parametrize("existing", [False, True], ids=["new-out", "over-a-previous-out"])
def test_a_full_disk_is_one_line_exit_2_and_leaves_nothing(tmp_path, trio, small_disk, existing):
    out = small_disk / "out"
    before_out = previous_out(out) if existing else None
    (small_disk / "filler").write_bytes(bytes(64 * 1024))
    listing = sorted(os.listdir(small_disk))
    before = tree_digest(*trio.values())
    proc = subprocess.run([sys.executable, "-m", "mscp", *patch_argv(trio, out, "--overwrite")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"mscp: error: cannot write {out}: No space left "
                                                                   "on device"), proc.stderr
    assert proc.stderr.rstrip().endswith("nothing was written")
    assert (tree_digest(out) == before_out) if existing else not out.exists()
    assert sorted(os.listdir(small_disk)) == listing
    assert tree_digest(*trio.values()) == before
