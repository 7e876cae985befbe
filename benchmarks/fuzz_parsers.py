"""Coverage-guided fuzzing (atheris, libFuzzer) of the parsers that read untrusted bytes.

    pip install atheris                                  # a dev tool, not a dependency of mscp
    python benchmarks/fuzz_parsers.py --seconds 1800     # every target, the time split between them
    python benchmarks/fuzz_parsers.py --target header --seconds 600
    python benchmarks/fuzz_parsers.py --target config_yaml,config_json --seconds 600   # a comma list
    python benchmarks/fuzz_parsers.py --write-seeds      # (re)write benchmarks/fuzz_corpus/ from the cases

Targets, each fed the bytes of one file:
  header          a .safetensors file (mscp.core.checkpoint.SafetensorsFile, then every tensor read)
  index           model.safetensors.index.json beside two real shards (Checkpoint of the folder)
  adapter_config  adapter_config.json beside a real adapter_model.safetensors (Adapter.load)
  prompts         a prompt file, .txt / .jsonl / .csv by the first byte (read_prompts)
  prompts_json    a .json prompt file: an array of strings, of {"prompt": ...} or of chat records
  prompts_chat    a .jsonl prompt file of chat records, {"messages": [{"role": ..., "content": ...}]}
  config_yaml     a --config .yaml file (read_config_file, then PatchConfig as the command line makes it)
  config_json     a --config .json file, the same way

A finding is any exception other than MSCPError, an MSCPError of more than one line (the contract:
one line), or an accepted input that breaks an oracle: the safetensors library must accept every
file mscp accepts and read the same bytes; accepted shards lie inside the folder; accepted scales
are finite; prompts are non-empty stripped strings without NUL that UTF-8 can encode; an accepted
config's to_dict() is strict JSON (the report and a batch's spec write it). The config targets
do not import torch, so PyYAML is instrumented too: its coverage guides the YAML mutations, but
each execution costs some hundred times more (--no-yaml-coverage instruments mscp only).
Seeds (benchmarks/fuzz_corpus/TARGET/) are the bad-input cases of the tests; new inputs go to
--work (default /tmp/mscp-fuzz), crashes to WORK/crashes/. Each target's last line of statistics
(executions, coverage) is printed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "fuzz_corpus"
TARGETS = ("header", "index", "adapter_config", "prompts", "prompts_json", "prompts_chat", "config_yaml",
           "config_json")
CONFIG_TARGETS = ("config_yaml", "config_json")  # no torch: PyYAML and mscp are instrumented
SPLIT = b"\x00\x00DATA\x00\x00"  # header target, odd first byte: header JSON, SPLIT, tensor bytes
PROMPT_SUFFIXES = (".txt", ".jsonl", ".csv")
DICTIONARY = ['"dtype"', '"shape"', '"data_offsets"', '"__metadata__"', '"F32"', '"F16"', '"BF16"', '"I64"',
              '"BOOL"', '"F8_E4M3"', '"weight_map"', '"metadata"', '"model-00001-of-00002.safetensors"',
              '"../model.safetensors"', '"peft_type"', '"LORA"', '"lora_alpha"', '"alpha_pattern"', '"rank_pattern"',
              '"use_rslora"', '"use_dora"', '"lora_bias"', '"prompt"', '"goal"', 'prompt,goal', 'NaN', 'Infinity',
              '"\\u0000"', '9223372036854775808', '4611686018427387904', '18446744073709551616',
              'null', 'true', '[', ']', '{', '}', '"\\ud800"', '\xef\xbb\xbf', '\xff\xfe',
              # chat records and --config files (JSON and YAML)
              '"messages"', '"role"', '"user"', '"assistant"', '"system"', '"content"',
              '"score"', '"criterion"', '"layers"', '"extra"', '"q"', '"rho"', '"device"', '"cuda:0"',
              'score: ', 'layers: ', 'extra: ', 'rho: ', 'q: ', 'backend: ', 'chat_template: ', 'device: ',
              '<<: ', '&a ', '*a', '!!binary ', '!!set ', '!!timestamp ', '!!python/object:', '!!str ', '!!int ',
              '!!float ', '!!map ', '!!seq ', '2001-12-14', '.nan', '.inf', '-.inf', '5e-1', '0x1f', '0o17',
              '1_000', 'yes', 'no', '~', '---', '...', '? ', ': ', '- ', '%YAML 1.1', '%TAG ', '|', '>', '\t']


# -- the files around each target ----------------------------------------------------------------
def make_fixtures(root: Path) -> dict[str, Path]:
    """A model folder with two shards (for index) and an adapter folder (for adapter_config)."""
    import torch
    from safetensors.torch import save_file

    model = root / "model"
    model.mkdir(parents=True, exist_ok=True)
    save_file({"a.weight": torch.ones(2, 3)}, str(model / "model-00001-of-00002.safetensors"))
    save_file({"b.weight": torch.zeros(4)}, str(model / "model-00002-of-00002.safetensors"))
    (root / "outside.safetensors").write_bytes((model / "model-00001-of-00002.safetensors").read_bytes())
    adapter = root / "adapter"
    adapter.mkdir(exist_ok=True)
    prefix = "base_model.model.model.layers.0.mlp.up_proj"
    save_file({f"{prefix}.lora_A.weight": torch.ones(2, 3), f"{prefix}.lora_B.weight": torch.ones(4, 2),
               "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight": torch.ones(2, 3),
               "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": torch.ones(3, 2)},
              str(adapter / "adapter_model.safetensors"))
    return {"model": model, "adapter": adapter, "root": root}


def header_file(data: bytes) -> bytes:
    """The .safetensors bytes a header-target input stands for."""
    if not data or data[0] % 2 == 0:
        return data[1:]
    header, _, tensors = data[1:].partition(SPLIT)
    return struct.pack("<Q", len(header)) + header + tensors


# -- one input of each target --------------------------------------------------------------------
class Targets:
    def __init__(self, root: Path, light: bool = False):
        from mscp.errors import MSCPError

        self.MSCPError = MSCPError
        self.root = root
        if light:  # the config targets: no torch, no fixtures
            return
        import torch
        from safetensors import safe_open

        from mscp.core.adapter import Adapter
        from mscp.core.checkpoint import Checkpoint, SafetensorsFile
        from mscp.core.prompts import read_prompts

        self.torch, self.safe_open = torch, safe_open
        self.Adapter, self.Checkpoint, self.SafetensorsFile, self.read_prompts = Adapter, Checkpoint, SafetensorsFile, read_prompts
        self.fx = make_fixtures(root)
        self.file = root / "input.safetensors"

    def refused(self, e: Exception) -> None:
        """The contract's refusal: one non-empty line."""
        message = str(e)
        assert message.strip() and len(message.splitlines()) == 1, f"not one line: {message!r:.300}"

    def header(self, data: bytes) -> None:
        self.file.write_bytes(header_file(data))
        try:
            st = self.SafetensorsFile(self.file)
            got = {name: st.read(name) for name in st.entries}
        except self.MSCPError as e:
            return self.refused(e)
        try:  # the format's own reader must agree with everything mscp accepts
            with self.safe_open(str(self.file), framework="pt") as f:
                theirs = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:  # noqa: BLE001 - any refusal by the library is the finding
            raise AssertionError(f"mscp accepted a file safetensors refuses: {e}") from None
        assert got.keys() == theirs.keys(), (sorted(got), sorted(theirs))
        for name, t in got.items():
            assert t.dtype == theirs[name].dtype and t.shape == theirs[name].shape, name
            assert t.view(-1).view(self.torch.uint8).equal(theirs[name].reshape(-1).view(self.torch.uint8)), name

    def index(self, data: bytes) -> None:
        model = self.fx["model"]
        (model / "model.safetensors.index.json").write_bytes(data)
        try:
            ckpt = self.Checkpoint(model)
        except self.MSCPError as e:
            return self.refused(e)
        for f in ckpt.files:
            assert f.parent == model, f"read {f}, outside {model}"
        for name in ckpt.keys():
            ckpt.get(name)

    def adapter_config(self, data: bytes) -> None:
        (self.fx["adapter"] / "adapter_config.json").write_bytes(data)
        try:
            adapter = self.Adapter.load(self.fx["adapter"])
        except self.MSCPError as e:
            return self.refused(e)
        import math

        for m in adapter.modules.values():
            assert isinstance(m.scale, float) and math.isfinite(m.scale), m

    def prompts(self, data: bytes) -> None:
        self._prompt_file(f"prompts{PROMPT_SUFFIXES[data[0] % 3] if data else '.txt'}", data[1:])

    def prompts_json(self, data: bytes) -> None:
        self._prompt_file("prompts.json", data)

    def prompts_chat(self, data: bytes) -> None:
        self._prompt_file("chat.jsonl", data)

    def _prompt_file(self, name: str, data: bytes) -> None:
        path = self.fx["root"] / name
        path.write_bytes(data)
        try:
            prompts = self.read_prompts(path)
        except self.MSCPError as e:
            return self.refused(e)
        assert prompts and all(isinstance(p, str) and p and p == p.strip() and "\x00" not in p for p in prompts)
        for p in prompts:
            p.encode("utf-8")  # a lone surrogate would fail in the tokenizer

    def config_yaml(self, data: bytes) -> None:
        self._config_file("config.yaml", data)

    def config_json(self, data: bytes) -> None:
        self._config_file("config.json", data)

    def _config_file(self, name: str, data: bytes) -> None:
        from mscp.core.config import PatchConfig, config_from_mapping, read_config_file

        path = self.root / name
        path.write_bytes(data)
        try:  # as `--config FILE` does (mscp/cli/options.py config_from_args)
            config = PatchConfig(**config_from_mapping(read_config_file(path)))
        except self.MSCPError as e:
            return self.refused(e)
        # the report and a batch's spec write the config as JSON; mscp reads JSON strictly (no NaN)
        json.dumps(config.to_dict(), allow_nan=False)


# -- seeds: the bad-input cases of tests/test_bad_input.py, and good files ---------------------------
def _raw_header(header, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return b"\x01" + raw + SPLIT + data


def seeds() -> dict[str, dict[str, bytes]]:
    f32x8 = struct.pack("<8f", *range(8))
    entry = {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}
    head = json.dumps({"w": entry}).encode().ljust(80)
    good_file = struct.pack("<Q", len(head)) + head + f32x8
    header = {
        "good": _raw_header({"w": entry, "__metadata__": {"format": "pt"}}, f32x8),
        "good-raw": b"\x00" + good_file,
        "two-tensors": _raw_header({"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},
                                    "b": {"dtype": "I64", "shape": [1], "data_offsets": [4, 12]}}, bytes(12)),
        "overlapping-offsets": _raw_header({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                            "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24)),
        "duplicate-names": b"\x01" + b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                                     b'"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}' + SPLIT + bytes(8),
        "gap": _raw_header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16)),
        "trailing-bytes": _raw_header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12)),
        "unknown-dtype": _raw_header({"w": {**entry, "dtype": "Q4"}}, f32x8),
        "shape-mismatch": _raw_header({"w": {**entry, "shape": [2, 2]}}, f32x8),
        "header-not-json": b"\x00" + struct.pack("<Q", 8) + b"\xff\x00{x    " + f32x8,
        "header-length-past-end": b"\x00" + struct.pack("<Q", 1 << 40) + b"{}",
        "header-a-list": _raw_header([], b""),
        "nan-shape": b"\x01" + b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}' + SPLIT + bytes(8),
        "deep-nesting": b"\x01" + b"[" * 5000 + SPLIT,
        "metadata-not-strings": _raw_header({"__metadata__": {"a": 1}, "w": entry}, f32x8),
        "shape-overflows-int64": _raw_header({"w": {"dtype": "F32", "shape": [2**62, 2**62, 0], "data_offsets": [0, 0]}},
                                             b""),
    }
    shards = {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}
    index = {
        "good": json.dumps({"metadata": {"total_size": 40}, "weight_map": shards}).encode(),
        "a-list": b"[1, 2]",
        "not-utf8": b'{"weight_map": {"a.weight": "model-00001-of-00002.safetensors\xff"}}',
        "utf16": '{"weight_map": {}}'.encode("utf-16"),
        "value-not-a-string": json.dumps({"weight_map": {"a.weight": 7}}).encode(),
        "outside-the-folder": json.dumps({"weight_map": {"a.weight": "../outside.safetensors"}}).encode(),
        "absolute-path": json.dumps({"weight_map": {"a.weight": "/etc/passwd"}}).encode(),
        "absent-tensor": json.dumps({"weight_map": {**shards, "ghost": "model-00001-of-00002.safetensors"}}).encode(),
        "broken": b'{"weight_map": {"a.weight": ',
        "no-weight-map": b'{"metadata": {}}',
    }
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["up_proj", "q_proj"]}
    adapter = {
        "good": json.dumps(config).encode(),
        "good-patterns": json.dumps({**config, "alpha_pattern": {"up_proj": 8}, "rank_pattern": {"q_proj": 2},
                                     "use_rslora": True}).encode(),
        "a-list": b"[]",
        "a-number": b"3",
        "not-utf8": b'{"peft_type": "LOR\xc1"}',
        "lora_alpha-a-string": json.dumps({**config, "lora_alpha": "16"}).encode(),
        "lora_alpha-null": json.dumps({**config, "lora_alpha": None}).encode(),
        "lora_alpha-nan": b'{"lora_alpha": NaN}',
        "invalid-regex": json.dumps({**config, "alpha_pattern": {"up_proj(": 8}}).encode(),
        "dora": json.dumps({**config, "use_dora": True}).encode(),
        "ia3": json.dumps({**config, "peft_type": "IA3"}).encode(),
        "duplicate-key": b'{"lora_alpha": 4, "lora_alpha": 8}',
    }
    prompts = {  # first byte: 0 .txt, 1 .jsonl, 2 .csv
        "txt": b"\x00How do I bake bread?\nName three rivers.\n",
        "latin-1": b"\x00caf\xe9 cr\xe8me\n",
        "utf-16": b"\x00" + "two\nlines\n".encode("utf-16"),
        "binary": b"\x00" + bytes(range(256)),
        "nul": b"\x00a\x00b\n",
        "jsonl": b'\x01{"prompt": "one"}\n{"prompt": "two"}\n',
        "jsonl-null": b'\x01{"prompt": null}\n',
        "jsonl-number": b'\x01{"prompt": 7}\n',
        "jsonl-broken": b'\x01{"prompt": \n',
        "csv": b'\x02prompt,category\n"one, with a comma",x\n"two\nlines",y\n',
        "csv-goal": b"\x02Goal,Target\nsomething,sure\n",
        "csv-no-column": b"\x02text\nhello\n",
        "csv-bom": b"\x02\xef\xbb\xbfprompt\nhi\n",
    }
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river."},
                         {"role": "assistant", "content": "The Nile."}, {"role": "user", "content": "Another?"}]}
    prompts_json = {
        "strings": json.dumps(["How do I bake bread?", "  Name three rivers.  ", ""]).encode(),
        "objects": json.dumps([{"prompt": "one", "category": "x"}, {"prompt": "two"}]).encode(),
        "chat": json.dumps([chat, {"messages": [{"role": "user", "content": "hi"}]}]).encode(),
        "mixed": json.dumps(["plain", {"prompt": "record"}, chat]).encode(),
        "an-object": json.dumps({"prompt": "one"}).encode(),
        "a-number": b"3",
        "empty-array": b"[]",
        "null-item": b'["one", null]',
        "nested-array": b'[["one"]]',
        "prompt-null": b'[{"prompt": null}]',
        "lone-surrogate": b'["caf\\ud800"]',
        "json-lines": b'{"prompt": "one"}\n{"prompt": "two"}\n',
        "duplicate-key": b'[{"prompt": "a", "prompt": "b"}]',
        "nan": b"[NaN]",
        "utf-16": '["one"]'.encode("utf-16"),
        "deep-nesting": b"[" * 5000,
    }
    prompts_chat = {  # .jsonl
        "chat": (json.dumps(chat) + "\n" + json.dumps({"messages": [{"role": "user", "content": "two"}]})
                 + "\n").encode(),
        "chat-and-prompt": (json.dumps({"prompt": "one"}) + "\n" + json.dumps(chat) + "\n").encode(),
        "no-user": json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}).encode(),
        "content-array": json.dumps({"messages": [{"role": "user",
                                                   "content": [{"type": "text", "text": "hi"}]}]}).encode(),
        "no-role": json.dumps({"messages": [{"content": "hi"}]}).encode(),
        "messages-an-object": json.dumps({"messages": {"role": "user", "content": "hi"}}).encode(),
        "messages-null": b'{"messages": null}',
        "content-null": b'{"messages": [{"role": "user", "content": null}]}',
        "role-a-list": b'{"messages": [{"role": ["user"], "content": "hi"}]}',
        "lone-surrogate": b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
        "a-list": b'[{"role": "user", "content": "hi"}]',
    }
    good = {"score": "attribution", "q": 0.05, "layers": "2-4", "backend": "torch", "chat_template": False}
    config_yaml = {
        "good": b"score: attribution\nq: 0.05\nlayers: 2-4\nbackend: torch\nchat_template: false\n",
        "yaml12-floats": b"q: 5e-2\nrho: 1e0\nalpha: .5\n",
        "layers-a-list": b"layers: [2, 4]\n",
        "merge-key": b"base: &b {q: 0.1, p: 0.2}\nextra: {<<: *b, p: 0.3}\n",
        "anchors": b"extra: {a: &a [x, y], b: [*a, *a]}\n",
        "extra-notes": b"extra:\n  note: |\n    two\n    lines\n  tags: [a, b]\n",
        "duplicate-key": b"q: 0.1\nq: 0.2\n",
        "unknown-field": b"quality: 3\n",
        "a-list": b"- q: 0.1\n",
        "a-string": b"just words\n",
        "empty": b"",
        "documents": b"q: 0.1\n---\nq: 0.2\n",
        "tab-indent": b"extra:\n\ta: 1\n",
        "python-tag": b"q: !!python/object/apply:os.system [true]\n",
        "bool-as-word": b"chat_template: no\nhash_inputs: yes\n",
        "nan": b"q: .nan\n",
        "mixed-keys": b"1: 2\nb: 3\n",
        "extra-date": b"extra: {when: 2001-12-14}\n",
        "extra-binary": b"extra: {blob: !!binary aGVsbG8=}\n",
        "big-int": b"max_prompts: " + b"9" * 4400 + b"\n",
        "deep-nesting": b"extra: " + b"[" * 3000,
    }
    config_json = {
        "good": json.dumps(good).encode(),
        "extra": json.dumps({"extra": {"note": "x", "n": [1, 2.5, None, True]}}).encode(),
        "duplicate-key": b'{"q": 0.1, "q": 0.2}',
        "nan": b'{"q": NaN}',
        "a-list": b'[{"q": 0.1}]',
        "null": b"null",
        "unknown-field": b'{"quality": 3}',
        "layers-a-number": b'{"layers": 3}',
        "bool-a-string": b'{"chat_template": "no"}',
        "int-a-float": b'{"batch_size": 4.0}',
        "device": b'{"device": "cuda:0", "backend": "cpp"}',
        "big-int": b'{"max_prompts": ' + b"9" * 4400 + b"}",
        "not-utf8": b'{"score": "wand\xe1"}',
        "deep-nesting": b'{"extra": ' + b"[" * 5000,
    }
    return {"header": header, "index": index, "adapter_config": adapter, "prompts": prompts,
            "prompts_json": prompts_json, "prompts_chat": prompts_chat, "config_yaml": config_yaml,
            "config_json": config_json}


def _dict_escape(word: str) -> str:
    """libFuzzer's dictionary syntax: printable ASCII as is, other bytes (and quote, backslash) as \\xNN."""
    data = word.encode("latin-1") if all(ord(c) < 256 for c in word) else word.encode()
    return "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}" for b in data)


def write_seeds() -> None:
    for target, cases in seeds().items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in cases.items():
            (folder / name).write_bytes(data)
    (CORPUS / "parsers.dict").write_text("".join(f'kw{k}="{_dict_escape(w)}"\n' for k, w in enumerate(DICTIONARY)))
    print(f"wrote {sum(len(c) for c in seeds().values())} seeds under {CORPUS}")


# -- running ---------------------------------------------------------------------------------------
def fuzz_one(target: str, seconds: int, work: Path, extra: list[str], yaml_coverage: bool = True) -> None:
    """Runs in its own process: libFuzzer exits when its time is up."""
    import atheris

    light = target in CONFIG_TARGETS
    if light:  # yaml not yet imported, so its parser is instrumented too (unless --no-yaml-coverage)
        with atheris.instrument_imports(include=["mscp", "yaml"] if yaml_coverage else ["mscp"]):
            import yaml  # noqa: F401

            import mscp.core.config  # noqa: F401
            import mscp.core.textfiles  # noqa: F401
    else:
        import safetensors.torch  # noqa: F401
        import torch  # noqa: F401 - imported before instrumenting, so only mscp is instrumented
        import transformers  # noqa: F401

        with atheris.instrument_imports(include=["mscp"]):
            import mscp.core.adapter  # noqa: F401
            import mscp.core.checkpoint  # noqa: F401
            import mscp.core.prompts  # noqa: F401

    scratch = Path(tempfile.mkdtemp(prefix=f"mscp-fuzz-{target}-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    run = getattr(Targets(scratch, light), target)
    corpus = work / target
    crashes = work / "crashes"
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    args = [sys.argv[0], str(corpus), str(CORPUS / target), f"-max_total_time={seconds}", "-max_len=8192",
            f"-dict={CORPUS / 'parsers.dict'}", f"-artifact_prefix={crashes}/{target}-", "-print_final_stats=1",
            "-timeout=20", "-rss_limit_mb=4096", *extra]
    atheris.Setup(args, run)
    atheris.Fuzz()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="all", help=f"'all' or a comma list of {', '.join(TARGETS)}")
    ap.add_argument("--seconds", type=int, default=60, help="total fuzzing time (split evenly for 'all')")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mscp-fuzz",
                    help="grown corpus and crash files")
    ap.add_argument("--write-seeds", action="store_true", help="write the seed corpus and exit")
    ap.add_argument("--no-yaml-coverage", action="store_true",
                    help="config targets: instrument mscp only, not PyYAML (much faster, blind to YAML's grammar)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, extra = ap.parse_known_args()
    if args.write_seeds:
        write_seeds()
        return
    if args.child:
        fuzz_one(args.target, args.seconds, args.work, extra, yaml_coverage=not args.no_yaml_coverage)
        return
    targets = TARGETS if args.target == "all" else tuple(args.target.split(","))
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        ap.error(f"unknown target {unknown[0]!r} (targets: {', '.join(TARGETS)})")
    per = max(1, args.seconds // len(targets))
    for target in targets:
        started = time.time()
        cmd = [sys.executable, __file__, "--child", "--target", target, "--seconds", str(per), "--work", str(args.work),
               *(["--no-yaml-coverage"] if args.no_yaml_coverage else []), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        log = args.work / f"{target}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + proc.stderr)
        stats = [line for line in (proc.stdout + proc.stderr).splitlines()
                 if line.startswith(("stat::number_of_executed_units", "stat::peak_rss_mb")) or "cov:" in line]
        crashes = sorted((args.work / "crashes").glob(f"{target}-*"))
        print(f"{target}: {time.time() - started:.0f} s, exit {proc.returncode}, {len(crashes)} crash file(s); "
              f"{'; '.join(stats[-3:])}  (log {log})", flush=True)


if __name__ == "__main__":
    main()
