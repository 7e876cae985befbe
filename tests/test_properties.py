"""Properties over random inputs (hypothesis).

1. The projection: for random shapes, ranks, masks, alpha and weights (V zero included), only the
   masked rows of lora_B change, bit for bit elsewhere, and they equal the float64 formula
   (1 - alpha) B + alpha V (V^T B) / ||V||_F; lora_A never changes.
2. Random byte-level corruptions of a safetensors shard, a shard index and adapter_config.json:
   `mscp patch` exits 2 with one `mscp: error:` line, or runs and writes a valid OUT; never a
   traceback, never another exit code, inputs never modified.

Example counts are small by default (the "ci" profile: a 2-core machine runs the whole suite);
MSCP_HYPOTHESIS_PROFILE=long runs many more:

    MSCP_HYPOTHESIS_PROFILE=long python -m pytest -q tests/test_properties.py
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import OUTPUT_FILES, tree_digest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from mscp.cli import main
from mscp.core.adapter import Adapter
from mscp.core.project import project_adapter

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("ci", max_examples=10, derandomize=True, **_COMMON)  # the same examples on every run
settings.register_profile("long", max_examples=500, **_COMMON)
settings.load_profile(os.environ.get("MSCP_HYPOTHESIS_PROFILE", "ci"))
EXAMPLES = settings().max_examples

PREFIX = "base_model.model.model.layers.0.mlp.up_proj"
WEIGHT = "model.layers.0.mlp.up_proj.weight"


# -- 1. the projection -----------------------------------------------------------------------------
@st.composite
def projections(draw):
    d_out, d_in, rank = draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.integers(1, 4))
    rows = sorted(draw(st.sets(st.integers(0, d_out - 1), max_size=d_out)))
    alpha = draw(st.floats(-16, 16, allow_nan=False))
    seed = draw(st.integers(0, 2**32 - 1))
    v_kind = draw(st.sampled_from(["random", "rank-1", "zero"]))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    gen = torch.Generator().manual_seed(seed)
    W_b = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
    if v_kind == "random":
        V = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) * scale
    elif v_kind == "rank-1":
        V = torch.outer(torch.randn(d_out, generator=gen, dtype=torch.float64),
                        torch.randn(d_in, generator=gen, dtype=torch.float64)) * scale
    else:
        V = torch.zeros(d_out, d_in, dtype=torch.float64)
    A = torch.randn(rank, d_in, generator=gen, dtype=torch.float64)
    B = torch.randn(d_out, rank, generator=gen, dtype=torch.float64)
    return W_b, W_b + V, A, B, rows, alpha


@settings(max_examples=EXAMPLES * 20)
@given(projections())
def test_the_projection_changes_only_masked_rows_and_equals_the_float64_formula(case):
    W_b, W_a, A, B, rows, alpha = case
    adapter = Adapter.from_state_dict({f"{PREFIX}.lora_A.weight": A, f"{PREFIX}.lora_B.weight": B})
    tensors, edits = project_adapter(adapter, {WEIGHT: W_b}, {WEIGHT: W_a}, {f"{PREFIX}.lora_B.weight": rows},
                                     alpha=alpha, backend="torch")
    out = tensors[f"{PREFIX}.lora_B.weight"]
    assert torch.equal(tensors[f"{PREFIX}.lora_A.weight"], A)
    outside = torch.ones(B.shape[0], dtype=torch.bool)
    outside[rows] = False
    assert torch.equal(out[outside], B[outside]), "a row outside the mask changed"
    V = W_a - W_b
    norm = torch.linalg.vector_norm(V)
    if norm == 0:
        assert torch.equal(out, B) and edits[f"{PREFIX}.lora_B.weight"].skipped == "V is zero"
        return
    expected = (1 - alpha) * B[rows] + alpha * (V[rows] @ (V.T @ B)) / norm
    scale = expected.abs().max().item() if rows else 0.0
    torch.testing.assert_close(out[rows], expected, rtol=1e-9, atol=1e-12 * (1 + scale))


# -- 2. corrupted files ------------------------------------------------------------------------------
FAST = ["--quiet", "--no-hash", "--backend", "torch", "--layers", "1-2"]


@pytest.fixture(scope="module")
def trio(tmp_path_factory, llama_trio):
    from mscp.core.prompts import default_prompts

    root = tmp_path_factory.mktemp("corrupt")
    trio = {role: Path(shutil.copytree(src, root / "in" / role)) for role, src in llama_trio.items()}
    for kind in ("harmful", "benign"):  # four prompts each: a valid run stays short
        (root / f"{kind}.txt").write_text("\n".join(default_prompts(kind)[:4]) + "\n")
    return trio


@st.composite
def corruptions(draw, size: int, hot: int):
    """Edits of a file of `size` bytes, most of them in its first `hot` bytes (a header, a JSON file)."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        at = draw(st.one_of(st.integers(0, max(0, hot - 1)), st.integers(0, max(0, size - 1))))
        edits.append((kind, at, draw(st.integers(0, 255)), draw(st.integers(1, 16))))
    return edits


def corrupt(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for kind, at, value, length in edits:
        at = min(at, len(out))
        if kind == "flip" and at < len(out):
            out[at] ^= 1 << (value % 8)
        elif kind == "set" and at < len(out):
            out[at] = value
        elif kind == "insert":
            out[at:at] = bytes([value]) * length
        elif kind == "delete":
            del out[at:at + length]
        elif kind == "truncate":
            del out[at:]
    return bytes(out)


def run_on_corrupted(trio, path: Path, data: bytes, capsys) -> int:
    """`mscp patch` with `path` holding `data`; checks the contract, restores the file, returns the exit code."""
    original = path.read_bytes()
    out = trio["base"].parent.parent / "out"
    try:
        path.write_bytes(data)
        before = tree_digest(*trio.values())
        prompts = trio["base"].parent.parent
        rc = main(["patch", "--base", str(trio["base"]), "--aligned", str(trio["aligned"]), "--adapter",
                   str(trio["adapter"]), "--out", str(out), "--harmful", str(prompts / "harmful.txt"),
                   "--benign", str(prompts / "benign.txt"), *FAST])
        err = capsys.readouterr().err
        assert tree_digest(*trio.values()) == before, "an input was modified"
        if rc == 2:
            assert err.startswith("mscp: error: ") and err.count("\n") == 1 and err.endswith("\n"), err
            assert not out.exists()
        else:
            # a valid run may warn (four prompts are fewer than the report's minimum), never more
            assert rc == 0 and all(line.startswith("mscp: warning: ") for line in err.splitlines()), (rc, err)
            assert set(os.listdir(out)) == OUTPUT_FILES
        assert not [n for n in os.listdir(out.parent) if n.startswith(".out.")]
        return rc
    finally:
        path.write_bytes(original)
        shutil.rmtree(out, ignore_errors=True)


def header_size(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


TARGETS = {
    "safetensors-shard": lambda trio: trio["base"] / "model-00002-of-00004.safetensors",
    "shard-index": lambda trio: trio["aligned"] / "model.safetensors.index.json",
    "adapter_config.json": lambda trio: trio["adapter"] / "adapter_config.json",
    "adapter-safetensors": lambda trio: trio["adapter"] / "adapter_model.safetensors",
}


@pytest.mark.slow
@pytest.mark.parametrize("target", list(TARGETS))
@given(data=st.data())
def test_a_corrupted_file_is_one_line_exit_2_or_a_valid_run(trio, capsys, target, data):
    path = TARGETS[target](trio)
    original = path.read_bytes()
    hot = header_size(path) if path.suffix == ".safetensors" else len(original)
    changed = corrupt(original, data.draw(corruptions(len(original), hot)))
    assume(changed != original)
    event(f"exit {run_on_corrupted(trio, path, changed, capsys)}")


@pytest.mark.slow
@pytest.mark.parametrize("target, edits", [
    pytest.param("safetensors-shard", lambda hot: [("flip", hot, 0, 1)], id="shard-mantissa-bit"),
    pytest.param("shard-index", lambda hot: [("insert", 1, 32, 2)], id="index-whitespace"),
    pytest.param("adapter_config.json", lambda hot: [("insert", 1, 10, 1)], id="config-newline"),
])
def test_a_harmless_corruption_gives_a_valid_run(trio, capsys, target, edits):
    """The other branch of the property above: what still parses is patched, not refused."""
    path = TARGETS[target](trio)
    original = path.read_bytes()
    hot = header_size(path) if path.suffix == ".safetensors" else len(original)
    changed = corrupt(original, edits(hot))
    assert changed != original
    assert run_on_corrupted(trio, path, changed, capsys) == 0


def test_corrupt_applies_each_kind_of_edit():
    data = bytes(range(10))
    assert corrupt(data, [("flip", 0, 1, 1)])[0] == 2
    assert corrupt(data, [("set", 3, 255, 1)])[3] == 255
    assert corrupt(data, [("insert", 2, 7, 3)]) == data[:2] + bytes([7, 7, 7]) + data[2:]
    assert corrupt(data, [("delete", 2, 0, 3)]) == data[:2] + data[5:]
    assert corrupt(data, [("truncate", 4, 0, 1)]) == data[:4]


def test_the_index_and_config_targets_are_json_the_run_reads(trio):
    assert isinstance(json.loads(TARGETS["shard-index"](trio).read_text())["weight_map"], dict)
    assert json.loads(TARGETS["adapter_config.json"](trio).read_text())["peft_type"] == "LORA"
