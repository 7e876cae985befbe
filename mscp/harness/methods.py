"""The repair methods the harness compares, as one registry: the demo, the Pareto runs and their
grids name methods from METHODS, and each builds its adapter the same way wherever it is used.

A method declares its parameters and builds a peft adapter folder from a `Bench`: the organism's
models, the fine-tuned adapter, and the rows' scores of a localisation pass (one pass per score
family, kept on disk). MSCP's rows come from the core's own selection (`Patcher.select`) and
its projection from `project.project_for`, so a Pareto point edits exactly the rows `mscp patch`
edits with the same settings (tests/test_evaluate.py checks it).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mscp.errors import MSCPError

WINDOWS = ("sigma", "all")  # the window the criterion chooses at the paper's width; every decoder layer
# attribution's task side (what p protects) -> its scoring pass: the task prompts' answers, or those
# and the benign prompts' answers (against over-refusal)
KEEP = {"task": "attribution", "task+benign": "attribution_keep_benign"}
SCORES_VERSION = 1  # the scoring passes' schema version in the store (Bench._pass)


def patch_on_localisation(org, adapter: Path, config, out, *, keep_benign: bool = False):
    """MSCP on a fine-tuned adapter of the organism, scored on the localisation splits only.
    keep_benign: the benign prompts join the task prompts on the side whose damage p removes (the
    fine-tuned model's answers to them are kept too, against over-refusal)."""
    from mscp.core.pipeline import patch
    from mscp.harness.organism import task_of

    sp = org.splits
    if out is not None:  # patch writes OUT, never its parents
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    task = [org.task_file("localize", task_of(adapter), ext="txt")] + ([sp / "benign_localize.txt"] if keep_benign else [])
    return patch(org.base, org.aligned, adapter, out, harmful=[sp / "harmful_localize.txt"],
                 benign=sp / "benign_localize.txt", task=task, config=config, overwrite=out is not None,
                 cache=org.patch_cache)


class Scored:
    """What a scoring pass leaves for the methods: its report and the per-row scores."""

    def __init__(self, report: dict, scores: dict):
        self.report, self.scores = report, scores


class Bench:
    """What the methods share on one fine-tune of the organism: its models, the adapter, the scoring
    passes (run on the localisation prompts only, each once, kept under `folder`) and the windows."""

    def __init__(self, org, adapter: Path, config, folder: Path):
        from mscp.core.adapter import Adapter

        self.org, self.adapter, self.config, self.folder = org, Path(adapter), config, Path(folder)
        self.lora = Adapter.load(adapter)
        self.n_layers = json.loads((org.aligned / "config.json").read_text())["num_hidden_layers"]
        self._scored: dict[str, Scored] = {}
        self._aligned = None  # the aligned model's shell, once a selection reads its weights

    # -- the scoring passes ---------------------------------------------------------------------------
    def scored(self, score: str, *, keep: str = "task", task_side: bool = True) -> Scored:
        """The scores of `score` for every row of every layer (for attribution, the task side only
        when `task_side`: p = 0 never reads it), computed on first use, then read back."""
        if keep not in KEEP:
            raise MSCPError(f"unknown attribution keep side {keep!r}; choose from {', '.join(KEEP)}")
        name = family(score, keep)
        have = self._scored.get(name)
        if have is not None and (score != "attribution" or not task_side or _has_task(have)):
            return have
        # the Wanda pass serves both Wanda scores (wanda_weight reads its rms figures); attribution
        # scores every layer, and its task side only when some point removes task rows
        config = (self.config.replace(score="attribution", p=0.01 if task_side else 0.0, layers=(0, self.n_layers - 1))
                  if score == "attribution" else self.config.replace(score="wanda"))
        self._scored[name] = self._pass(config, keep_benign=keep == "task+benign")
        return self._scored[name]

    def scoring_seconds(self) -> dict[str, float | None]:
        return {name: s.report.get("timings_s", {}).get("wall") for name, s in self._scored.items()}

    def seed(self, result, *, score: str, keep: str = "task") -> None:
        """Use a patch's own scores (the demo has them already) instead of a scoring pass."""
        self._scored[family(score, keep)] = Scored(result.report, result.scores)

    def _pass(self, config, keep_benign: bool) -> Scored:
        """One scoring pass, kept in the store folder/scores/ as a folder entry
        `<score>[_keep_benign]-v<SCORES_VERSION>-<digest>` (report.json, scores.safetensors) under
        the inputs and the config, so a rerun (more grid points, an interrupted run) does not
        score again."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file, save_file

        from mscp.core.report import check_report
        from mscp.core.store import Store
        from mscp.harness.evaluate import folder_digest

        org = self.org
        parts = [folder_digest(org.base), folder_digest(org.aligned), folder_digest(self.adapter),
                 folder_digest(org.splits, (".txt", ".jsonl")), config.to_dict(), keep_benign]

        def fill(folder: Path) -> None:
            print(f"scoring rows: {config.score} ...", flush=True)
            clock = time.time()
            res = patch_on_localisation(org, self.adapter, config, None, keep_benign=keep_benign)
            res.report["timings_s"]["wall"] = time.time() - clock
            save_file({f"{kind}::{k}": t.contiguous() for k, sc in res.scores.items() for kind, t in sc.items()},
                      str(folder / "scores.safetensors"))
            (folder / "report.json").write_text(json.dumps(res.report, indent=1) + "\n")

        def read(folder: Path) -> Scored:
            try:
                tensors = load_file(str(folder / "scores.safetensors"))
            except SafetensorError as e:
                raise ValueError(f"damaged scores in {folder}: {e}") from None
            scores: dict = {}
            for name, t in tensors.items():
                kind, _, k = name.partition("::")
                scores.setdefault(k, {})[kind] = t
            try:  # another mscp's report: a miss (the store scores again)
                report = check_report(json.loads((folder / "report.json").read_text()), folder / "report.json")
            except MSCPError as e:
                raise ValueError(str(e)) from None
            return Scored(report, scores)

        kind = f"{config.score}{'_keep_benign' if keep_benign else ''}"
        return Store(self.folder / "scores").folder(kind, parts, SCORES_VERSION, fill, read)

    # -- windows and rows -------------------------------------------------------------------------------
    def window(self, name: str) -> list[int]:
        """'sigma': the criterion's window at the paper's width (rho 0.2), whatever rho the config
        carries (the package default, every layer, would make every sigma point an all-layers
        point); 'all': every decoder layer."""
        from mscp.core.config import PAPER_SETTING
        from mscp.core.localize import safety_layers

        if name == "all":
            return list(range(self.n_layers))
        if name != "sigma":
            raise MSCPError(f"unknown window {name!r}; choose from {', '.join(WINDOWS)}")
        curves = next(iter(self._scored.values()), None) or self.scored("wanda")
        return safety_layers(curves.report["layer_curves"], self.config.replace(rho=PAPER_SETTING["rho"], layers=None))

    def windows(self) -> dict[str, list[int]]:
        return {name: self.window(name) for name in WINDOWS}

    def point_config(self, params: dict):
        """The PatchConfig of an MSCP point: the bench's config with the point's score, q and p (a
        point's q is its row count: the fixed budget)."""
        return self.config.replace(budget="fixed", **{k: params[k] for k in ("score", "q", "p") if k in params})

    def rows(self, params: dict) -> dict:
        """The rows `mscp patch` selects with the point's settings, restricted to its window."""
        from mscp.core.patcher import AdapterRun, Patcher, Window
        from mscp.core.streaming import ModelShell

        config = self.point_config(params)
        res = self.scored(config.score, keep=params.get("keep", "task"), task_side=config.p > 0)
        if config.score == "wanda_weight" and self._aligned is None:  # its selection reads W_aligned
            self._aligned = ModelShell(self.org.aligned, label="aligned")
        patcher = Patcher(config, aligned_model=self._aligned, window=Window(self.window(params["window"])))
        return patcher.select(AdapterRun.of_scores(self.lora, res.scores))


# -- the methods ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    name: str
    params: tuple[str, ...]
    """The knobs a point may set."""
    summary: str
    build: Callable[[Bench, dict, Path], float]
    """Writes the method's adapter at a point (its params) into a folder; returns its edit fraction."""


def _mscp(bench: Bench, params: dict, out: Path) -> float:
    from mscp.core.project import edit_fraction, project_for
    from mscp.harness.baselines import write_adapter

    config = bench.point_config(params)
    (tensors, edits), = project_for(config, [bench.lora], bench.org.base, bench.org.aligned, [bench.rows(params)])
    fraction = edit_fraction(bench.lora, edits)
    write_adapter(bench.adapter, tensors, out, {"method": "mscp", **params, "edit_fraction": fraction})
    return fraction


def _mscp_default(bench: Bench, params: dict, out: Path) -> float:
    return patch_on_localisation(bench.org, bench.adapter, bench.config, out).report["edit_fraction"]


def _safe_lora(bench: Bench, params: dict, out: Path) -> float:
    from mscp.harness import baselines

    k = max(1, round(params["modules"] * len(bench.lora.modules))) if "modules" in params else None
    return baselines.safe_lora(bench.org.base, bench.org.aligned, bench.adapter, out, tau=params.get("tau"),
                               k=k)["edit_fraction"]


def _csulora(bench: Bench, params: dict, out: Path) -> float:
    from mscp.harness import baselines

    return baselines.csulora(bench.org.base, bench.org.aligned, bench.adapter, out,
                             energy=params.get("energy", baselines.CSULORA_ENERGY),
                             lam=params.get("lam", baselines.CSULORA_LAM))["edit_fraction"]


def _drop_layers(bench: Bench, params: dict, out: Path) -> float:
    from mscp.harness import baselines

    return baselines.drop_layers(bench.adapter, bench.window(params["window"]), out)["edit_fraction"]


def _wanda_zero(bench: Bench, params: dict, out: Path) -> float:
    from mscp.harness import baselines

    rows = bench.rows({**params, "score": "wanda"})
    return baselines.wanda_prune(bench.adapter, {"modules": {k: {"rows": v.tolist(), "skipped": None}
                                                             for k, v in rows.items()}}, out)["edit_fraction"]


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("mscp", ("score", "q", "p", "window", "keep"),
           "MSCP: the selected lora_B rows projected onto the safety direction", _mscp),
    Method("mscp_default", (), "MSCP with the package defaults, as `mscp patch` runs it: the adaptive budget "
           "chooses each adapter's row count", _mscp_default),
    Method("safe_lora", ("tau", "modules"),
           "Safe LoRA: whole modules projected where cos(C dW, dW) < tau, or the given share of modules", _safe_lora),
    Method("csulora", ("energy", "lam"),
           "CSULoRA (our reading of its abstract): each LoRA direction's part outside the aligned-minus-base "
           "subspace holding `energy` shrunk by 1/(1 + lambda_j)", _csulora),
    Method("drop_safety_layers", ("window",), "the adapter removed on the window's layers", _drop_layers),
    Method("wanda_zero", ("q", "p", "window"), "MSCP's Wanda rows zeroed instead of projected", _wanda_zero),
)}


def resolve(point_method: str, params: dict) -> tuple[Method, dict]:
    """A grid's method name ('mscp:wanda' fixes the score) -> (the method, the point's full params)."""
    name, _, score = point_method.partition(":")
    method = METHODS.get(name)
    if method is None:
        raise MSCPError(f"unknown method {point_method!r}; choose from {', '.join(METHODS)}")
    full = {**params, **({"score": score} if score else {})}
    unknown = sorted(set(full) - set(method.params))
    if unknown:
        raise MSCPError(f"method {name} has no parameter {unknown[0]!r} (it has: {', '.join(method.params)})")
    return method, full


def grid_names() -> list[str]:
    """Every name a grid (and `mscp demo --pareto --methods`) may give: a method, or 'mscp:SCORE'
    for a method whose score `resolve` fixes from the name."""
    from mscp.core.config import SCORES

    names: list[str] = []
    for m in METHODS.values():
        names += [f"{m.name}:{score}" for score in SCORES] if "score" in m.params else [m.name]
    return names


def build(bench: Bench, point_method: str, params: dict, out: Path) -> float:
    method, full = resolve(point_method, params)
    return method.build(bench, full, Path(out))


def family(score: str, keep: str = "task") -> str:
    """The scoring pass a score's rows come from."""
    return KEEP[keep] if score == "attribution" else "wanda"


def _has_task(scored: Scored) -> bool:
    return any(sc.get("task") is not None for sc in scored.scores.values())
