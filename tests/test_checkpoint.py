"""Reading checkpoints (`mscp.core.checkpoint`) and LoRA adapters (`mscp.core.adapter`)."""
from __future__ import annotations

import hashlib
import json
import random
import struct
from pathlib import Path

import pytest
import torch
from conftest import mapped_file
from safetensors.torch import load_file, save_file

from mscp.core.adapter import Adapter
from mscp.core.checkpoint import Checkpoint, StateDictSource, open_source, sha256_file
from mscp.errors import MSCPError

ST_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


def make_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.f32": torch.randn(11, 5, generator=g),
        "w.bf16": torch.randn(9, 6, generator=g).to(torch.bfloat16),
        "w.f16": torch.randn(10, 3, generator=g).to(torch.float16),
        "w.i64": torch.randint(-(2**40), 2**40, (8, 4), generator=g, dtype=torch.int64),
        "norm.f32": torch.randn(7, generator=g),
        "conv.f16": torch.randn(4, 3, 2, generator=g).to(torch.float16),
        "count.i64": torch.tensor(12345678901, dtype=torch.int64),
    }


TENSORS = make_tensors()
MATRICES = ["w.f32", "w.bf16", "w.f16", "w.i64"]


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], n_shards: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for k in range(n_shards):
        shard = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::n_shards]}
        save_file(part, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def write_single(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def write_safetensors_in_order(path: Path, tensors: dict[str, torch.Tensor], order: list[str]) -> None:
    """A valid safetensors file whose header and data follow `order` (save_file would sort them)."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in order:
        t = tensors[name].contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": ST_DTYPE[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return write_sharded(tmp_path_factory.mktemp("ckpt") / "sharded", TENSORS)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    return write_single(tmp_path_factory.mktemp("ckpt") / "single", TENSORS)


# -- whole tensors ---------------------------------------------------------------------------------
def test_sharded_checkpoint_reads_every_tensor_like_safetensors(sharded):
    ckpt = Checkpoint(sharded)
    reference = {}
    for shard in sorted(sharded.glob("*.safetensors")):
        reference.update(load_file(shard))
    assert sorted(ckpt.keys()) == sorted(reference) == sorted(TENSORS)
    for name, expected in reference.items():
        assert_same(ckpt.get(name), expected)
        assert ckpt.shape(name) == tuple(expected.shape)
        assert name in ckpt


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_mapped_reads_equal_copied_reads_and_view_the_shard_file(sharded):
    ck = Checkpoint(sharded)
    for name in ck.keys():
        view, copy = ck.get(name, mapped=True), ck.get(name)
        assert view.dtype == copy.dtype and view.shape == copy.shape and torch.equal(view, copy)
        assert mapped_file(view.data_ptr()).endswith(".safetensors")
        assert mapped_file(copy.data_ptr()) is None or not mapped_file(copy.data_ptr()).endswith(".safetensors")
        address = view.data_ptr()
        del view
        assert mapped_file(address) is None or not mapped_file(address).endswith(".safetensors"), "still mapped"


def test_single_file_and_sharded_folders_give_the_same_tensors(single, sharded):
    a, b = Checkpoint(single), Checkpoint(sharded)
    assert sorted(a.keys()) == sorted(b.keys())
    for name in a.keys():
        assert_same(a.get(name), b.get(name))
        assert_same(a.get(name), TENSORS[name])


def test_a_safetensors_file_path_opens_as_a_checkpoint(single):
    ckpt = Checkpoint(single / "model.safetensors")
    for name, t in TENSORS.items():
        assert_same(ckpt.get(name), t)


def test_synthetic_model_shards_read_like_safetensors(llama_trio):
    ckpt = Checkpoint(llama_trio["aligned"])
    shards = sorted(llama_trio["aligned"].glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(ckpt.files) == sorted([*shards, llama_trio["aligned"] / "model.safetensors.index.json"])
    n = 0
    for shard in shards:
        for name, t in load_file(shard).items():
            assert_same(ckpt.get(name), t)
            n += 1
    assert n == len(ckpt.keys())


def test_get_casts_dtype(single):
    ckpt = Checkpoint(single)
    assert_same(ckpt.get("w.bf16", dtype=torch.float32), TENSORS["w.bf16"].float())
    assert_same(ckpt.get("w.f32", dtype=torch.float64), TENSORS["w.f32"].double())


def test_unknown_tensor_name_raises(single):
    with pytest.raises(MSCPError, match="has no tensor nope"):
        Checkpoint(single).get("nope")


# -- row subsets -----------------------------------------------------------------------------------
ROW_CASES = {
    "runs": lambda n: [0, 1, 2, 5, 6, n - 1],
    "single-first": lambda n: [0],
    "single-last": lambda n: [n - 1],
    "single-middle": lambda n: [n // 2],
    "scattered": lambda n: list(range(1, n, 2)),
    "empty": lambda n: [],
    "all": lambda n: list(range(n)),
}


@pytest.mark.parametrize("selection", ROW_CASES, ids=list(ROW_CASES))
@pytest.mark.parametrize("name", MATRICES)
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_get_rows_equals_the_full_tensor_indexed(request, layout, name, selection):
    ckpt = Checkpoint(request.getfixturevalue(layout))
    full = TENSORS[name]
    rows = torch.tensor(ROW_CASES[selection](full.shape[0]), dtype=torch.int64)
    assert_same(ckpt.get(name, rows=rows), full[rows])


def test_get_rows_of_a_3d_tensor_reads_whole_slices(single):
    rows = torch.tensor([1, 2])
    assert_same(Checkpoint(single).get("conv.f16", rows=rows), TENSORS["conv.f16"][rows])


# -- non-finite values -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_finite_float_tensors_raise(tmp_path, dtype, bad):
    t = torch.zeros(4, 3, dtype=dtype)
    t[2, 1] = bad
    write_single(tmp_path, {"w": t, "ok": torch.zeros(4, 3, dtype=dtype)})
    ckpt = Checkpoint(tmp_path, label="base")
    with pytest.raises(MSCPError, match="base tensor w contains NaN or Inf"):
        ckpt.get("w")
    with pytest.raises(MSCPError, match="contains NaN or Inf"):
        ckpt.get("w", rows=torch.tensor([2]))
    assert_same(ckpt.get("w", rows=torch.tensor([0, 1, 3])), torch.zeros(3, 3, dtype=dtype))
    assert_same(ckpt.get("ok"), torch.zeros(4, 3, dtype=dtype))


# -- broken folders --------------------------------------------------------------------------------
def test_shard_index_naming_an_absent_tensor_raises(tmp_path):
    folder = write_sharded(tmp_path / "m", TENSORS)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.weight"] = next(iter(data["weight_map"].values()))
    index.write_text(json.dumps(data))
    with pytest.raises(MSCPError, match="absent from the shards, e.g. ghost.weight"):
        Checkpoint(folder)


def test_shard_index_naming_a_missing_shard_raises(tmp_path):
    folder = write_sharded(tmp_path / "m", TENSORS)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(MSCPError, match="missing safetensors file: .*model-00002-of-00003"):
        Checkpoint(folder)


def write_raw_safetensors(path: Path, header, data: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


EIGHT_FLOATS = torch.arange(8, dtype=torch.float32).numpy().tobytes()


@pytest.mark.parametrize("header", [
    pytest.param([], id="header-is-a-list"),
    pytest.param({"w": 3}, id="entry-not-an-object"),
    pytest.param({"w": {"dtype": "F32", "shape": [2, 4]}}, id="entry-without-data_offsets"),
    pytest.param({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 32]}}, id="byte-range-larger-than-shape"),
    pytest.param({"w": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 16]}}, id="byte-range-smaller-than-shape"),
    pytest.param({"w": {"dtype": "F32", "shape": [2, 4], "data_offsets": [32, 0]}}, id="reversed-offsets"),
    pytest.param({"w": {"dtype": "Q4", "shape": [2, 4], "data_offsets": [0, 32]}}, id="unknown-dtype"),
    pytest.param({"w": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
                  "z": {"dtype": "F32", "shape": [2**64, 0], "data_offsets": [32, 32]}}, id="dimension-over-uint64"),
    pytest.param({"w": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
                  "z": {"dtype": "F32", "shape": [2**62, 2**62, 0], "data_offsets": [32, 32]}}, id="zero-size-over-int64"),
    pytest.param({"w": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
                  "z": {"dtype": "F32", "shape": [0] * 65, "data_offsets": [32, 32]}}, id="65-dimensions"),
])
def test_structurally_corrupt_header_raises_mscp_error(tmp_path, header):
    """Valid JSON that is not a valid safetensors header is bad input, never a silent or raw-Python failure."""
    path = tmp_path / "model.safetensors"
    write_raw_safetensors(path, header, EIGHT_FLOATS)
    with pytest.raises(MSCPError):
        ckpt = Checkpoint(path)
        for name in ckpt.keys():
            ckpt.get(name)
            ckpt.get(name, rows=torch.tensor([1]))


def test_hand_written_header_in_good_order_reads_back(tmp_path):
    path = tmp_path / "model.safetensors"
    write_raw_safetensors(path, {"w": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}}, EIGHT_FLOATS)
    assert_same(Checkpoint(path).get("w"), torch.arange(8, dtype=torch.float32).reshape(2, 4))


def test_folder_without_weights_raises(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MSCPError, match="no model.safetensors"):
        Checkpoint(tmp_path, label="base")


def test_missing_path_raises(tmp_path):
    with pytest.raises(MSCPError, match="path does not exist"):
        Checkpoint(tmp_path / "nowhere")


def test_pickle_is_refused_unless_allowed_and_then_reads_the_same(tmp_path):
    torch.save(TENSORS, tmp_path / "pytorch_model.bin")
    with pytest.raises(MSCPError, match="--allow-pickle"):
        Checkpoint(tmp_path)
    ckpt = Checkpoint(tmp_path, allow_pickle=True)
    for name, t in TENSORS.items():
        assert_same(ckpt.get(name), t)
    rows = torch.tensor([0, 3, 4])
    assert_same(ckpt.get("w.f16", rows=rows), TENSORS["w.f16"][rows])


# -- in-memory state dicts -------------------------------------------------------------------------
def test_open_source_of_a_dict_reads_like_a_checkpoint(single):
    mem = open_source(dict(TENSORS), "aligned")
    disk = open_source(single, "aligned")
    assert isinstance(mem, StateDictSource) and isinstance(disk, Checkpoint)
    assert sorted(mem.keys()) == sorted(disk.keys())
    for name in TENSORS:
        assert name in mem
        assert mem.shape(name) == disk.shape(name)
        assert_same(mem.get(name), disk.get(name))
    rows = torch.tensor([1, 2, 4])
    for name in MATRICES:
        assert_same(mem.get(name, rows=rows), disk.get(name, rows=rows))
    assert_same(mem.get("w.bf16", dtype=torch.float32), disk.get("w.bf16", dtype=torch.float32))


def test_open_source_of_a_dict_returns_copies():
    source = {"w": torch.ones(3, 2)}
    got = open_source(source, "base").get("w")
    got.zero_()
    assert torch.equal(source["w"], torch.ones(3, 2))


def test_open_source_of_a_dict_checks_names_and_values():
    src = open_source({"w": torch.tensor([[1.0, float("nan")]])}, "base")
    with pytest.raises(MSCPError, match="base tensor w contains NaN or Inf"):
        src.get("w")
    with pytest.raises(MSCPError, match="has no tensor v"):
        src.get("v")
    with pytest.raises(MSCPError, match="has no tensor v"):
        src.shape("v")


def test_open_source_passes_an_open_source_through(single):
    ckpt = Checkpoint(single)
    assert open_source(ckpt, "base") is ckpt


# -- checksums -------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 4096, 100_003])
@pytest.mark.parametrize("chunk", [7, 1 << 16, 16 << 20])
def test_sha256_file_equals_hashlib(tmp_path, size, chunk):
    data = random.Random(size).randbytes(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path, chunk=chunk) == hashlib.sha256(data).hexdigest()


# -- adapters --------------------------------------------------------------------------------------
def test_adapter_pairs_lora_a_and_b_by_name_whatever_the_file_order(tmp_path, llama_trio):
    original = Adapter.load(llama_trio["adapter"])
    tensors = load_file(llama_trio["adapter"] / "adapter_model.safetensors")
    order = list(tensors)
    random.Random(1).shuffle(order)
    b_first = sorted(order, key=lambda k: ("lora_A" in k, k))  # every lora_B, then every lora_A
    for n, key_order in enumerate([order, b_first, list(reversed(sorted(tensors)))]):
        folder = tmp_path / f"shuffled{n}"
        folder.mkdir()
        (folder / "adapter_config.json").write_bytes((llama_trio["adapter"] / "adapter_config.json").read_bytes())
        write_safetensors_in_order(folder / "adapter_model.safetensors", tensors, key_order)
        ckpt = Checkpoint(folder, stem="adapter_model")
        assert ckpt.keys() == key_order  # the file really holds them in this order
        loaded = Adapter.load(folder)
        assert loaded.modules == original.modules
        for key in tensors:
            assert_same(loaded.tensors[key], tensors[key])


def test_adapter_from_a_shuffled_state_dict_pairs_the_same(llama_trio):
    tensors = load_file(llama_trio["adapter"] / "adapter_model.safetensors")
    config = json.loads((llama_trio["adapter"] / "adapter_config.json").read_text())
    order = list(tensors)
    random.Random(2).shuffle(order)
    shuffled = Adapter.from_state_dict({k: tensors[k] for k in order}, config)
    assert shuffled.modules == Adapter.load(llama_trio["adapter"]).modules
    for m in shuffled.modules.values():
        assert m.key_a.endswith(".lora_A.weight") and m.key_b.endswith(".lora_B.weight")
        assert m.key_a.removesuffix(".lora_A.weight") == m.key_b.removesuffix(".lora_B.weight") == f"base_model.model.{m.module}"


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


PEFT_OPTIONS = {
    "alpha-over-r": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "rslora-r9": dict(r=9, lora_alpha=5, use_rslora=True),
    "rank-and-alpha-pattern": dict(r=8, lora_alpha=16, rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 4}),
    "layer-specific-patterns": dict(r=4, lora_alpha=8, rank_pattern={"layers.0.mlp.down_proj": 6},
                                    alpha_pattern={"model.layers.1.self_attn.q_proj": 32}),
    "regex-pattern": dict(r=4, lora_alpha=8, alpha_pattern={r"layers\.[01]\.self_attn\.(q|v)_proj": 3}),
    "rslora-with-rank-pattern": dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 16}),
}


@pytest.mark.parametrize("options", PEFT_OPTIONS.values(), ids=list(PEFT_OPTIONS))
def test_lora_scale_and_rank_follow_peft(tmp_path, options):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], **options))
    expected = {name.removeprefix("base_model.model."): (module.scaling["default"], module.r["default"])
                for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    assert len(expected) == 6
    if any(k.endswith("pattern") for k in options):  # the patterns really select some modules
        assert len(set(expected.values())) > 1
    model.save_pretrained(str(tmp_path))
    adapter = Adapter.load(tmp_path)
    got = {m.module: (m.scale, m.rank) for m in adapter.modules.values()}
    assert got.keys() == expected.keys()
    for module, (scale, rank) in expected.items():
        assert got[module][1] == rank, module
        assert got[module][0] == pytest.approx(scale, rel=1e-12), module


def test_adapter_written_by_peft_with_a_regex_target_is_patched(tmp_path, llama_trio, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mscp.cli import main

    regex = r".*\.(q_proj|down_proj)$"
    model = AutoModelForCausalLM.from_pretrained(str(llama_trio["aligned"]))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=regex))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)  # peft starts B at zero: "train" it
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"] == regex

    out = tmp_path / "out"
    argv = ["patch", "--base", str(llama_trio["base"]), "--aligned", str(llama_trio["aligned"]),
            "--adapter", str(tmp_path / "adapter"), "--out", str(out), "--layers", "0-4",
            "--quiet", "--no-hash", "--backend", "torch"]
    assert main(argv) == 0, capsys.readouterr().err

    report = json.loads((out / "mscp_report.json").read_text())
    expected = {f"model.layers.{i}.{m}" for i in range(5) for m in ("self_attn.q_proj", "mlp.down_proj")}
    assert {m["module"] for m in report["modules"].values()} == expected
    assert report["adapter"]["modules"] == len(expected)
    assert report["adapter"]["target_modules"] == regex
    before = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    after = load_file(out / "adapter_model.safetensors")
    assert after.keys() == before.keys()
    assert any(not torch.equal(after[k], before[k]) for k in before if "lora_B" in k)
    assert all(torch.equal(after[k], before[k]) for k in before if "lora_A" in k)
