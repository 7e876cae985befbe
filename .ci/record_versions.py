"""Record a `make test-latest` run: the date, the suite's closing line and the versions it used.

    python .ci/record_versions.py VENV LOCK RESULTS_MD

Writes the whole `pip freeze` to docs/results/data/versions-latest-<date>.txt (-2, -3, ... for a
later run the same day: an earlier entry keeps its own list) and puts a dated entry at the top of
RESULTS_MD naming each version that differs from LOCK (the set `make test` installs).
"""
from __future__ import annotations

import datetime
import re
import subprocess
import sys
from pathlib import Path

HEADER = """# The newest allowed dependency versions, tested

`make test-latest` installs the newest versions `pyproject.toml` allows into an empty `.venv-latest`
and runs the suite; each run adds an entry here (newest first) with the versions that differ from
`requirements-lock.txt`, the set `make install` / `make test` / `make demo` install. After a passing
run, `make lock` makes its versions the lock.
"""


MAIN = ("transformers", "peft", "safetensors", "kernels", "huggingface-hub", "tokenizers", "numpy", "triton", "ray",
        "pytest", "pip", "setuptools")  # named when there is no lock to compare with


def pins(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)", line.strip())
        if m:
            out[re.sub(r"[-_.]+", "-", m[1]).lower()] = m[2]
    return out


def main(venv: str, lock: str, results: str) -> None:
    python = Path(venv) / "bin" / "python"
    freeze = subprocess.run([str(python), "-m", "pip", "freeze", "--all", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    log = Path(venv) / "pytest.log"
    closing = log.read_text().strip().splitlines()[-1] if log.is_file() and log.read_text().strip() else "(no log)"
    closing = closing.strip("= ")
    day = datetime.date.today().isoformat()
    folder = Path(results).parent / "data"
    folder.mkdir(parents=True, exist_ok=True)
    data, n = folder / f"versions-latest-{day}.txt", 2
    while data.exists():  # an earlier run of the day: its entry links to its own list
        data, n = folder / f"versions-latest-{day}-{n}.txt", n + 1
    data.write_text("\n".join(freeze) + "\n")

    locked = pins(Path(lock).read_text().splitlines()) if lock and Path(lock).is_file() else {}
    newest = pins(freeze)
    changed = [f"| {name} | {locked.get(name, '(not locked)')} | {version} |"
               for name, version in sorted(newest.items()) if locked.get(name) != version]
    python_version = subprocess.run([str(python), "-c", "import sys; print(sys.version.split()[0])"],
                                    capture_output=True, text=True).stdout.strip()
    entry = [f"## {day}: {closing}", "",
             f"Python {python_version}; {len(newest)} packages; the whole list: "
             f"[data/{data.name}](data/{data.name}).", ""]
    if not locked:
        entry += ["No lock to compare with: these versions became the first lock. The main ones: "
                  + ", ".join(f"{n} {newest[n]}" for n in MAIN if n in newest) + ".", ""]
    elif changed:
        entry += ["| package | locked | newest |", "|---|---|---|", *changed, ""]
    else:
        entry += ["Every version equals the lock's.", ""]

    path = Path(results)
    old = path.read_text() if path.is_file() else HEADER
    head, _, rest = old.partition("\n## ")
    body = "\n".join(entry) + ("\n## " + rest if rest else "")
    path.write_text(head.rstrip() + "\n\n" + body)
    print(f"recorded in {path}: {closing}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
