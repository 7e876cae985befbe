"""Configuration of a patch: every choice the method leaves open is a field here, with its default.

`PatchConfig` is frozen and validated in one place (`__post_init__`); each field's help text lives
in its metadata, from which the command line's options are generated (mscp/cli/options.py). The
whole dataclass is written into each run's report (`mscp_report.json`, key "config").
"""
from __future__ import annotations

import dataclasses
import math
import os
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal, TypeAlias, get_args

from mscp.errors import MSCPError

# Each string option's choices, written once: a Literal for type checkers, its tuple for the checks
# in __post_init__ and for argparse (mscp/cli/options.py reads the hints, and takes a Literal as str).
Criterion: TypeAlias = Literal["sigma", "li_gap"]
Projector: TypeAlias = Literal["safelora", "exact"]
DType: TypeAlias = Literal["auto", "float32", "bfloat16", "float16", "float64"]
Backend: TypeAlias = Literal["auto", "torch", "triton", "cpp", "cuda"]
FinetunedPass: TypeAlias = Literal["auto", "with_calibration", "after_window"]
Score: TypeAlias = Literal["wanda", "wanda_weight", "attribution"]
Budget: TypeAlias = Literal["auto", "fixed", "adaptive"]
BenignGuard: TypeAlias = Literal["probability", "greedy", "both"]
CRITERIA: tuple[str, ...] = get_args(Criterion)
PROJECTORS: tuple[str, ...] = get_args(Projector)
DTYPES: tuple[str, ...] = get_args(DType)
BACKEND_CHOICES: tuple[str, ...] = get_args(Backend)
FINETUNED_PASSES: tuple[str, ...] = get_args(FinetunedPass)
SCORES: tuple[str, ...] = get_args(Score)
BUDGETS: tuple[str, ...] = get_args(Budget)
BENIGN_GUARDS: tuple[str, ...] = get_args(BenignGuard)
# The public API's argument types (check_arguments' kinds "path", "files", "prompts")
PathArg: TypeAlias = str | os.PathLike[str]
PromptFiles: TypeAlias = PathArg | Sequence[PathArg]
PromptLists: TypeAlias = Mapping[str, Sequence[str] | None]  # set (harmful, benign, task) -> prompts
# The paper's own setting (docs/method.md): Wanda rows, q = p = 0.3, the σ window at rho 0.2.
PAPER_SETTING = MappingProxyType(dict(score="wanda", q=0.3, p=0.3, rho=0.2))  # read-only: shared
# The linear modules of a Llama-family decoder layer: the usual LoRA targets (organism, synth, plots)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_layer_range(text) -> tuple[int, int]:
    """'10-15' -> (10, 15); '12' -> (12, 12); a pair stays a pair. The one parser of layer ranges."""
    if isinstance(text, (tuple, list)) and len(text) == 2:
        first, last = text
    else:
        try:
            s = str(text).strip()
            first, last = s.split("-", 1) if "-" in s[1:] else (s, s)
        except ValueError:
            raise MSCPError(f"--layers must look like A-B (e.g. 10-15), got {text!r}") from None
    if any(isinstance(x, (bool, float)) for x in (first, last)):  # int() would cut 1.5 to 1
        raise MSCPError(f"--layers must look like A-B (e.g. 10-15), got {text!r}")
    try:
        return int(first), int(last)
    except (TypeError, ValueError):
        raise MSCPError(f"--layers must look like A-B (e.g. 10-15), got {text!r}") from None


def option(default, help: str, *, choices=None, flag: str | None = None, flag_help: str | None = None,
           metavar: str | None = None, parse=None, cli: bool = True, cli_default=None):
    """A PatchConfig field with its command-line description.

    help: what the field means; flag: the option's name when it is not --field-name (e.g.
    '--no-hash' for a True default), with `flag_help` saying what the flag does; parse: turns the
    option's text into the value; cli=False: API and config files only; cli_default: the command
    line's default where it differs from the API's (progress bars: shown there, not in a library)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "flag_help": flag_help,
                                            "metavar": metavar, "parse": parse, "cli": cli,
                                            "cli_default": cli_default})


@dataclass(frozen=True)
class PatchConfig:
    # Level 1: safety layers
    # Defaults: chosen by pareto.choose_defaults on the organism's localisation prompts (docs/evaluation.md,
    # section 7); the paper's own setting is PAPER_SETTING (score wanda, q 0.3, p 0.3, rho 0.2).
    rho: float = option(1.0, "safety window width as a fraction of the decoder layers: w = max(1, round(rho * n_layers)); "
                        "1.0 = every layer (the default: the fine-tune's damage is not confined to a window); the "
                        "paper uses 0.2")
    layers: tuple[int, int] | None = option(None, "explicit safety layers A-B, inclusive, counted from 0; skips the "
                                            "criterion", metavar="A-B", parse=parse_layer_range)
    criterion: Criterion = option("sigma", "layer criterion: 'sigma' (base/aligned divergence gradient) or 'li_gap' "
                                  "(Li et al.'s benign/harmful gap inside the aligned model)", choices=CRITERIA)

    # Level 2: safety neurons
    score: Score = option("attribution", "row score: 'wanda' (the paper's |W| n summed over a row), 'wanda_weight' "
                          "(Wei et al.'s per-weight set difference, then each row's safety-only mass) or 'attribution' "
                          "(the first-order effect of each row's edit on the aligned refusal's likelihood; "
                          "docs/method.md)", choices=SCORES)
    q: float = option(0.02, "safety rows (budget 'fixed'): the top q fraction of each module's rows by the "
                      "harmful-prompt score (attribution: of all rows in the safety layers, ranked together)")
    p: float = option(0.0, "task rows: the top p fraction by the task-prompt score (attribution: by task damage), "
                      "removed from the safety rows")
    budget: Budget = option("auto", "how many rows: 'fixed' (the top q fraction), 'adaptive' (attribution only: per "
                            "adapter, the fewest rows that win back `recover` of the lost refusals without raising "
                            "benign refusals by more than max_over_refusal, checked by forward passes; docs/method.md) "
                            "or 'auto' (adaptive with the attribution score, fixed with the others)", choices=BUDGETS)
    recover: float = option(0.8, "adaptive budget: the share of the lost refusals the edit must win back, measured as "
                            "the probability of the aligned model's refusal openings on the harmful prompts")
    max_over_refusal: float = option(0.03, "adaptive budget: how much more likely than the aligned model the patched "
                                     "one may be to open a benign answer with a refusal (probability, mean over "
                                     "the benign prompts)")
    benign_guard: BenignGuard = option("both", "adaptive budget: what max_over_refusal bounds: 'probability' "
                                       "(the rise of the mean probability of the refusal opening on the benign "
                                       "prompts), 'greedy' (the rise of the share of benign prompts that greedy "
                                       "decoding opens with it) or 'both'", choices=BENIGN_GUARDS)
    max_edit: float = option(0.05, "adaptive budget: the most it may edit, as a fraction of the LoRA's parameters "
                             "(the paper's bound: 5 percent)")
    budget_checks: int = option(2, "adaptive budget: the most forward passes that measure proposed counts (refusals "
                                "won back, benign refusals added) and narrow the next ones (0: the first-order "
                                "estimate alone)")
    budget_probes: int = option(3, "adaptive budget: counts each check pass measures per adapter, in the same "
                                "pass (more compute, no more weight reads)")
    budget_refine: bool = option(False, "adaptive budget: a pass after one that found a count meeting both bounds "
                                 "looks for fewer rows below it (off: only adapters with no such count are checked "
                                 "again; fewer passes, more rows)")
    benign_penalty: float = option(0.3, "attribution: rank rows by the harmful score less this weight times the rise "
                                   "their edit brings to a refusal's likelihood on the benign prompts (scored in the "
                                   "same pass; 0: not scored)")
    target_tokens: int = option(16, "attribution: length of the greedy answers scored (the aligned model's to the "
                                "harmful prompts, the fine-tuned model's to the task prompts)")
    resident_gb: float | None = option(None, "attribution: GB of layers kept loaded while the greedy answers are "
                                       "generated, so each layer is read once rather than once per token (0: "
                                       "none; None: half the memory free on the compute device)",
                                       parse=float, metavar="GB")

    # Projection
    alpha: float = option(1.0, "blend towards the projection: B' = (1 - alpha) B + alpha C B on the selected rows")
    projector: Projector = option("safelora", "'safelora': C = V V^T / ||V||_F; 'exact': C = Q Q^T, Q the top "
                                  "exact_rank left singular vectors of V", choices=PROJECTORS)
    exact_rank: int = option(64, "rank of Q for the 'exact' projector")

    # Calibration
    max_prompts: int = option(1024, "prompts used of each set (harmful, benign, task) at most: a larger set is "
                              "sampled (seed 0, file order kept; the report's prompts_sampled records it) with a "
                              "warning. Calibration needs hundreds of prompts; a 50,000-line file would take an hour")
    max_length: int = option(256, "prompts longer than this many tokens (after the chat template) are truncated")
    batch_size: int = option(16, "prompts per forward call through a decoder layer")
    chat_template: bool = option(True, "tokenise prompts with the tokenizer's chat template, when it has one",
                                 flag="--no-chat-template",
                                 flag_help="tokenise prompts as plain text, without the tokenizer's chat template")

    # Execution
    device: str = option("cpu", "compute device: cpu or cuda[:N]")
    dtype: DType = option("auto", "compute dtype of the streamed layers ('auto': the checkpoint's); statistics "
                          "are always fp32", choices=DTYPES)
    backend: Backend = option("auto", "kernel backend of the mscp ops", choices=BACKEND_CHOICES)
    finetuned_pass: FinetunedPass = option("auto", "when the fine-tuned streams (one per adapter) run: "
                                           "'with_calibration' (one pass, every layer), 'after_window' (a second "
                                           "pass up to the window's last layer), 'auto' (after_window for several "
                                           "adapters without --layers)", choices=FINETUNED_PASSES)
    allow_pickle: bool = option(False, "accept .bin/.pt checkpoints (loaded with weights_only=True)")
    hash_inputs: bool = option(True, "record the sha256 of every input file in the report", flag="--no-hash",
                               flag_help="skip the sha256 of the input files in the report")
    progress: bool = option(False, "progress bars on stderr (the command line shows them unless --quiet)",
                            flag="--quiet", flag_help="no progress bars", cli_default=True)

    extra: dict = field(default_factory=dict, metadata={"help": "free-form notes carried into the report",
                                                        "cli": False})

    def __post_init__(self):
        def check(ok: bool, message: str):
            if not ok:
                raise MSCPError(message)

        for name in ("rho", "q", "p", "alpha", "recover", "max_edit", "max_over_refusal", "benign_penalty"):
            value = getattr(self, name)
            check(_finite_number(value), f"{name} must be a finite number, got {value!r:.60}")
        for name in ("chat_template", "allow_pickle", "hash_inputs", "progress", "budget_refine"):  # "no" would be true
            value = getattr(self, name)
            check(isinstance(value, bool), f"{name} must be True or False, got {value!r:.60}")
        check(0 < self.rho <= 1, f"rho must be in (0, 1], got {self.rho}")
        for name in ("q", "p", "max_edit", "max_over_refusal"):
            check(0 <= getattr(self, name) <= 1, f"{name} must be a fraction in [0, 1], got {getattr(self, name)}")
        check(-16 <= self.alpha <= 16, f"alpha must be in [-16, 16], got {self.alpha}")
        check(0 < self.recover <= 1, f"recover must be in (0, 1], got {self.recover}")
        for name, allowed in (("score", SCORES), ("criterion", CRITERIA), ("projector", PROJECTORS), ("dtype", DTYPES),
                              ("backend", BACKEND_CHOICES), ("finetuned_pass", FINETUNED_PASSES),
                              ("budget", BUDGETS), ("benign_guard", BENIGN_GUARDS)):
            check(getattr(self, name) in allowed, f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.layers is not None:
            first, last = parse_layer_range(self.layers)
            check(0 <= first <= last, f"layers must be a range A-B with 0 <= A <= B, got {first}-{last}")
            object.__setattr__(self, "layers", (first, last))
        for name in ("batch_size", "max_length", "exact_rank", "target_tokens", "max_prompts", "budget_checks",
                     "budget_probes"):
            check(isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool),
                  f"{name} must be an integer, got {getattr(self, name)!r}")
        check(self.batch_size >= 1 and self.max_length >= 1, "batch_size and max_length must be positive")
        check(self.exact_rank >= 1, f"exact_rank must be positive, got {self.exact_rank}")
        check(self.target_tokens >= 1, f"target_tokens must be positive, got {self.target_tokens}")
        check(0 <= self.budget_checks <= 8, f"budget_checks must be in 0..8, got {self.budget_checks}")
        check(1 <= self.budget_probes <= 8, f"budget_probes must be in 1..8, got {self.budget_probes}")
        check(0 <= self.benign_penalty <= 100, f"benign_penalty must be in [0, 100], got {self.benign_penalty}")
        check(self.budget != "adaptive" or self.score == "attribution",
              f"the adaptive budget needs the attribution score (its scores are log-likelihood changes), got {self.score!r}")
        check(self.resident_gb is None or (_finite_number(self.resident_gb) and self.resident_gb >= 0),
              f"resident_gb must be a number of GB >= 0, got {self.resident_gb!r:.60}")
        check(self.max_prompts >= 1, f"max_prompts must be positive, got {self.max_prompts}")
        check(isinstance(self.device, str) and _valid_device(self.device),
              f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        # known before any work (a first C++ build takes 40 s): which backends a device can run
        on_cuda = self.device.startswith("cuda")
        check(not (self.backend == "cuda" and not on_cuda),
              "backend 'cuda' is not available on the cpu device: it runs on CUDA (--device cuda)")
        check(not (self.backend == "cpp" and on_cuda),
              "backend 'cpp' is not available on a CUDA device: it runs on the cpu device")
        check(isinstance(self.extra, dict), "extra must be a dict")
        problem = _json_problem(self.extra)
        check(problem is None, f"extra must hold JSON data (the report writes it): it {problem}")

    @property
    def adaptive_budget(self) -> bool:
        """Whether the row count is the adaptive budget's (core/budget.py), not q's."""
        return self.budget == "adaptive" or (self.budget == "auto" and self.score == "attribution")

    def replace(self, **changes) -> "PatchConfig":
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(changes) - set(field_names()))
        if unknown:
            raise MSCPError(f"unknown PatchConfig field {unknown[0]!r}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def with_overrides(config: "PatchConfig", overrides: Mapping) -> "PatchConfig":
    """`config` with some fields replaced, the one way the API's keywords and the command line's
    options change it. A q given without a budget means the fixed budget: q is its row count, and
    the adaptive budget (the default with the attribution score) would ignore it."""
    changes = dict(overrides)
    if "q" in changes and "budget" not in changes and config.budget == "auto":
        changes["budget"] = "fixed"
    return config.replace(**changes) if changes else config


def _finite_number(value) -> bool:
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an int past float's range
        return False


def _json_problem(value, limit: int = 10_000) -> str | None:
    """Why `value` is not plain JSON data, or None. Iterative, and at most `limit` values: a YAML
    alias repeated inside `extra` is one object here but many copies in the report."""
    stack, count = [value], 0
    while stack:
        v = stack.pop()
        count += 1
        if count > limit:
            return f"holds more than {limit} values"
        if isinstance(v, dict):
            key = next((k for k in v if not isinstance(k, str)), None)
            if key is not None:
                return f"has a key that is not a string ({_brief(key)})"
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, float) and not math.isfinite(v):
            return f"holds {v}, which is not JSON"
        elif isinstance(v, int) and not _writable_int(v):
            return "holds an integer too long to write"
        elif not (v is None or isinstance(v, (str, int, float, bool))):
            return f"holds a {type(v).__name__} ({_brief(v)})"
    return None


def _brief(value) -> str:
    return " ".join(reprlib.repr(value).split())[:60]


def _writable_int(v: int) -> bool:
    try:  # json.dumps calls int.__repr__, which refuses more digits than sys.get_int_max_str_digits()
        repr(v)
    except ValueError:
        return False
    return True


def _valid_device(device: str) -> bool:
    kind, _, index = device.partition(":")
    return kind in ("cpu", "cuda") and (not index or (index.isdigit() and kind == "cuda"))


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(PatchConfig)]


def config_from_mapping(values: dict, *, where: str = "config") -> dict:
    """PatchConfig field values from a mapping (a config file, a report's `config`), checked by name."""
    if not isinstance(values, dict):
        raise MSCPError(f"{where} must be a mapping of PatchConfig fields, got {type(values).__name__}")
    unknown = sorted(set(values) - set(field_names()), key=repr)  # YAML keys may be numbers or null
    if unknown:
        raise MSCPError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(field_names())})")
    out = dict(values)
    if out.get("layers") is not None:
        out["layers"] = parse_layer_range(out["layers"])
    return out


def read_config_file(path) -> dict:
    """The fields of a YAML or JSON config file (`--config FILE`). A key given twice is refused (which
    one wins is the parser's whim); YAML numbers are read as YAML 1.2 reads them (`5e-1` is 0.5)."""
    from mscp.core.textfiles import parse_json, read_text

    path = Path(path)
    text = read_text(path, "config file")
    if path.suffix.lower() == ".json":
        values = parse_json(text, f"config file {path} is not valid JSON")
    else:
        import yaml

        try:
            values = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
        except Exception as e:  # noqa: BLE001 - yaml parse errors and duplicate keys
            raise MSCPError(f"config file {path} is not valid YAML: {' '.join(str(e).split())[:160]}") from None
    return config_from_mapping(values or {}, where=f"config file {path}")


def _yaml_loader():
    """yaml.SafeLoader, but a key given twice in one mapping is an error and YAML 1.2 floats such as
    5e-1 or 1e5 (strings to YAML 1.1, which wants a dot and a signed exponent) are numbers."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges, explicit keys override it
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float)) and (type(key), key) in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
                seen.add((type(key), key))
            return super().construct_mapping(node, deep=deep)

    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"),
                                 list("-+.0123456789"))
    return Loader


# -- the public API's arguments ----------------------------------------------------------------
def _is_path(x) -> bool:
    if not isinstance(x, (str, os.PathLike)):
        return False
    text = os.fspath(x)  # a PathLike may give bytes
    return isinstance(text, str) and bool(text.strip()) and "\0" not in text


_KINDS = {  # kind -> (test, what a value must be)
    "path": (_is_path, "a path (a non-empty str or os.PathLike)"),
    "file": (_is_path, "a prompt file's path (prompt lists go in prompts={set: [...]})"),
    "str": (lambda x: isinstance(x, str), "a string"),
    "bool": (lambda x: isinstance(x, bool), "True or False"),
    "config": (lambda x: isinstance(x, PatchConfig), "a PatchConfig (PatchConfig(**values), or keyword overrides)"),
}
PROMPT_SETS = ("harmful", "benign", "task")


def check_arguments(**named) -> None:
    """The public API's arguments, each name=(value, kind, *other accepted types): the first of the
    wrong kind is one MSCPError line naming it, never a TypeError from deep inside.

    kind: one of _KINDS; 'kind?' also accepts None; '[kind]' a list or tuple of it (each item
    named `name[i]`); 'files' one prompt file or a list of them; 'prompts' the `prompts=`
    mapping of prompt set -> list of prompts; 'data' a mapping whose tensors hold data (none on
    the meta device; other types pass)."""
    for name, (value, kind, *also) in named.items():
        if kind.endswith("?"):
            if value is None:
                continue
            kind = kind[:-1]
        if (also and isinstance(value, tuple(also))) or (kind == "files" and _is_path(value)):
            continue
        if kind == "files":
            if not isinstance(value, (list, tuple)):
                raise MSCPError(f"{name} must be a prompt file's path or a list of them, got {_shown(value)}")
            kind = "[file]"
        if kind.startswith("["):
            if not isinstance(value, (list, tuple)):
                raise MSCPError(f"{name} must be a list, got {_shown(value)}")
            check_arguments(**{f"{name}[{i}]": (v, kind[1:-1], *also) for i, v in enumerate(value)})
        elif kind == "prompts":
            _check_prompt_lists(value, name)
        elif kind == "data":
            meta = next((k for k, v in value.items() if getattr(v, "is_meta", False) is True), None) \
                if isinstance(value, Mapping) else None
            if meta is not None:
                raise MSCPError(f"{name} holds a tensor on the meta device, which has no data ({meta!r:.80})")
        elif not _KINDS[kind][0](value):
            raise MSCPError(f"{name} must be {_KINDS[kind][1]}, got {_shown(value)}")


def _check_prompt_lists(prompts, name: str) -> None:
    from mscp.core.textfiles import unicode_problem

    if not isinstance(prompts, Mapping):
        raise MSCPError(f"{name} must be a dict of prompt lists by set ({', '.join(PROMPT_SETS)}), "
                        f"got {_shown(prompts)}")
    unknown = next((k for k in prompts if k not in PROMPT_SETS), None)
    if unknown is not None:  # a typo would silently fall back to the built-in set
        raise MSCPError(f"{name} has an unknown key {unknown!r} (allowed: {', '.join(PROMPT_SETS)})")
    for key, texts in prompts.items():
        if texts is None:
            continue
        if not isinstance(texts, (list, tuple)):
            raise MSCPError(f"{name}[{key!r}] must be a list of prompt strings, got {_shown(texts)}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise MSCPError(f"{name}[{key!r}][{i}] must be a prompt string, got {_shown(text)}")
            problem = unicode_problem(text)
            if problem:
                raise MSCPError(f"{name}[{key!r}][{i}] {problem}")


def _shown(value) -> str:
    """A value for a one-line message: its type and a short repr."""
    if value is None:
        return "None"
    text = " ".join(reprlib.repr(value).split())
    return f"{type(value).__name__} {text[:80]}"
