"""The layout is the architecture: imports point one way (cli -> harness -> continual -> core ->
kernels -> errors, paths), never in a circle, and the patcher loads nothing of the harness."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# lower layers never import higher ones
RANKS = {"mscp.errors": 0, "mscp.paths": 0, "mscp.kernels": 1, "mscp.core": 2, "mscp": 3, "mscp.executors": 4, "mscp.continual": 5,
         "mscp.harness": 6, "mscp.cli": 7, "mscp.__main__": 8}


def module_files() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "mscp").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """mscp modules imported anywhere in the file (module level and inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import submodule` names the submodule; `from module import name`, the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:  # `from mscp.core import config` names a module; `import x.y` its package
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def rank(module: str) -> int:
    best = max((p for p in RANKS if module == p or module.startswith(p + ".")), key=len)
    return RANKS[best]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def test_every_module_has_a_layer(graph):
    for module in graph:
        assert rank(module) is not None


def test_imports_only_point_down(graph):
    wrong = sorted(f"{a} (layer {rank(a)}) imports {b} (layer {rank(b)})" for a, deps in graph.items() for b in deps
                   if rank(b) > rank(a))
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles(graph):
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def loaded_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return set(out.stdout.split())


@pytest.mark.parametrize("code", ["from mscp import patch, fast_project, PatchConfig\npatch, fast_project",
                                  "from mscp import patch_peft_model, patch_many\npatch_peft_model, patch_many",
                                  "import mscp.core.pipeline"])
def test_the_patcher_loads_nothing_of_the_harness(code):
    """Nor the optional extras: no Ray, matplotlib or Triton for a patch (the executors load Ray)."""
    mods = loaded_after(code)
    assert "mscp.core.pipeline" in mods or "patch" not in code
    leaked = sorted(m for m in mods if m.startswith(("mscp.harness", "mscp.cli", "mscp.executors", "matplotlib",
                                                      "ray", "triton")))
    assert not leaked, leaked


@pytest.mark.parametrize("command", ["", "patch", "continual", "eval", "demo", "organism", "synth", "bench"])
def test_help_needs_no_torch(command):
    code = ("import contextlib, io\nfrom mscp.cli import build_parser\n"
            f"with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            f"    build_parser().parse_args({[command, '--help'] if command else ['--help']!r})")
    mods = loaded_after(code)
    assert "torch" not in mods


def test_every_option_has_help():
    from mscp.cli import build_parser

    parser = build_parser()
    missing = []

    def walk(p, prefix):
        for action in p._actions:
            if action.help is None and action.dest not in ("help",):
                missing.append(f"{prefix} {'/'.join(action.option_strings) or action.dest}")
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix} {name}")

    walk(parser, "mscp")
    assert not missing, missing
