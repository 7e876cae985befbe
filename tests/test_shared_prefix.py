"""The prompts' shared opening runs once per stream (core/shared_prefix.py): the budget's checks get
the same log-likelihoods as from whole prompts, in every model family, for several LoRAs in one pass."""
from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, full_model_logliks, make_trio

from mscp.core.adapter import Adapter
from mscp.core.attribution import target_logliks
from mscp.core.patcher import modules_by_layer
from mscp.core.shared_prefix import MIN_SHARED, shared_length
from mscp.core.streaming import ModelShell


def test_the_shared_length_is_the_common_opening_less_each_prompts_last_token():
    opening = list(range(10, 10 + MIN_SHARED + 4))
    assert shared_length([opening + [1, 2], opening + [3], opening + [1, 5, 6]]) == len(opening)
    assert shared_length([opening + [1], opening]) == len(opening) - 1  # the shorter keeps its last token
    assert shared_length([opening[:MIN_SHARED - 1] + [1], opening[:MIN_SHARED - 1] + [2]]) == 0  # too short to pay
    assert shared_length([[9] + opening, opening]) == 0
    assert shared_length([opening + [1]]) == len(opening)
    assert shared_length([]) == 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch_size", [2, 3])
def test_checks_with_a_shared_opening_match_whole_prompts_in_float64(trio_root, family, batch_size):
    trio = make_trio(trio_root, family)
    g = torch.Generator().manual_seed(batch_size)
    opening = torch.randint(3, 500, (MIN_SHARED + 5,), generator=g).tolist()
    prompts = [opening + torch.randint(3, 500, (n,), generator=g).tolist() for n in (1, 6, 3, 9, 2)]
    targets = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (4, 1, 3, 2, 4)]
    assert shared_length(prompts) == len(opening)
    shell = ModelShell(trio["aligned"], label="aligned", dtype="float64")
    adapter = Adapter.load(trio["adapter"])
    other = Adapter(adapter.config, {k: -2.5 * t if "lora_B" in k else t for k, t in adapter.tensors.items()})
    by_layer = modules_by_layer(adapter, shell)
    got = target_logliks(shell, shell.head(), prompts, targets, [None, (adapter, by_layer), (other, by_layer)],
                         batch_size=batch_size, pad_id=0)
    for each, lora in zip(got, (None, adapter, other)):  # each stream attends to its own opening's keys
        assert each.loglik.tolist() == pytest.approx(full_model_logliks(trio, lora, prompts, targets), rel=1e-6)
    assert got[1].loglik.tolist() != pytest.approx(got[2].loglik.tolist(), rel=1e-3)
