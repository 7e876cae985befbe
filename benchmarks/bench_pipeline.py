"""pytest-benchmark cases of the pipeline on a small synthetic trio (`make bench`).

The figures at real sizes come from `mscp bench` (see docs/scale.md); these cases track
regressions of the same paths: full patch, projection only, and K adapters in one pass.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mscp import fast_project
from mscp.core.pipeline import patch, patch_many
from mscp.core.prompts import default_prompts
from mscp.harness.synth import SynthSpec, write_trio

SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=512, rank=8)
PROMPTS = {"harmful": default_prompts("harmful")[:8], "benign": default_prompts("benign")[:8],
           "task": default_prompts("benign")[-8:]}
OPTS = dict(prompts=PROMPTS, progress=False, hash_inputs=False)


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return write_trio(tmp_path_factory.mktemp("bench"), SynthSpec(family="llama", **SHAPE))


@pytest.fixture(scope="module")
def masks(trio):
    return {k: m["rows"] for k, m in patch(trio["base"], trio["aligned"], trio["adapter"], **OPTS).report["modules"].items()}


def test_full_patch(benchmark, trio):
    benchmark(patch, trio["base"], trio["aligned"], trio["adapter"], **OPTS)


def test_projection_only(benchmark, trio, masks):
    benchmark(fast_project, trio["adapter"], trio["base"], trio["aligned"], masks)


@pytest.mark.parametrize("k", [1, 4])
def test_k_adapters_in_one_pass(benchmark, trio, tmp_path, k):
    adapters = [trio["adapter"]]
    for seed in range(1, k):
        folder = tmp_path / f"a{seed}"
        shutil.copytree(trio["adapter"], folder)
        t = load_file(str(folder / "adapter_model.safetensors"))
        g = torch.Generator().manual_seed(seed)
        save_file({n: torch.randn(v.shape, generator=g) * v.std() for n, v in t.items()},
                  str(folder / "adapter_model.safetensors"))
        adapters.append(folder)
    benchmark.pedantic(patch_many, args=(trio["base"], trio["aligned"], adapters), kwargs=OPTS, rounds=3)
