"""CSULoRA, the second post-hoc peer baseline (harness/baselines.py), as we read its abstract:
per LoRA direction u_j of dW = s B A, the part inside the safety subspace of D = W_aligned - W_base
is kept and the rest is shrunk by 1 / (1 + lambda_j), lambda_j = lam (1 - rho_j) / rho_j."""
import math

import pytest
import torch
from safetensors.torch import load_file

from mscp.errors import MSCPError
from mscp.harness import baselines
from mscp.harness.baselines import csulora, csulora_b, csulora_subspace


def dense_reference(b, a, s, d, energy, lam, eps=1e-12):
    """The corrected update s B' A, computed the slow, obvious way in float64: the dense D, P and dW,
    and each direction's penalized minimum-change problem solved as its linear system
    (I + lambda_j (I - P)) X_j = sigma_j u_j v_j^T."""
    b, a, d = b.double(), a.double(), d.double()
    u_d, s_d, _ = torch.linalg.svd(d)
    share = torch.cumsum(s_d ** 2, 0) / (s_d ** 2).sum()
    k = 1
    while share[k - 1] < energy:
        k += 1
    P = u_d[:, :k] @ u_d[:, :k].T
    eye = torch.eye(d.shape[0], dtype=torch.float64)
    dw = s * b @ a
    u, sig, vh = torch.linalg.svd(dw)
    x = torch.zeros_like(dw)
    for j in range(b.shape[1]):  # the rank-r directions; the rest have sigma ~ 0
        rho = float((P @ u[:, j]).square().sum())
        lam_j = lam * (1 - rho) / max(rho, eps)
        x += torch.linalg.solve(eye + lam_j * (eye - P), sig[j] * torch.outer(u[:, j], vh[j]))
    return x, P, k


def random_problem(seed, d_out, d_in, r):
    g = torch.Generator().manual_seed(seed)
    # a displacement with a decaying spectrum, so the energy share picks a k between 1 and d_out
    q1, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))
    n = min(d_out, d_in)
    d = q1[:, :n] @ torch.diag(0.7 ** torch.arange(n, dtype=torch.float64)) @ q2[:, :n].T
    b = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    a = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    return b, a, d


@pytest.mark.parametrize("seed,d_out,d_in,r", [(1, 7, 11, 3), (2, 13, 5, 4), (3, 17, 9, 1), (4, 10, 10, 6),
                                               (5, 23, 19, 5)])
@pytest.mark.parametrize("energy,lam", [(0.5, 1.0), (0.9, 4.0), (0.75, 16.0)])
def test_the_low_rank_result_is_the_dense_penalized_minimum_change_solution(seed, d_out, d_in, r, energy, lam):
    b, a, d = random_problem(seed, d_out, d_in, r)
    s = 1.7
    want, P, k = dense_reference(b, a, s, d, energy, lam)
    u_k = csulora_subspace(d, energy)
    assert u_k.shape == (d_out, k)
    torch.testing.assert_close(u_k @ u_k.T, P, rtol=0, atol=1e-10)
    b_new, info = csulora_b(b, a, u_k, lam)
    assert b_new.shape == b.shape  # lora_A is kept: the result is a LoRA of the same rank
    torch.testing.assert_close(s * b_new @ a, want, rtol=1e-9, atol=1e-10)
    change = torch.linalg.norm(want - s * b @ a) / torch.linalg.norm(s * b @ a)
    assert info["relative_change"] == pytest.approx(float(change), rel=1e-7, abs=1e-12)


def test_lam_zero_returns_the_update_unchanged():
    b, a, d = random_problem(7, 12, 9, 4)
    b_new, info = csulora_b(b, a, csulora_subspace(d, 0.5), 0.0)
    torch.testing.assert_close(b_new, b, rtol=0, atol=1e-12)
    assert info["c"] == [1.0] * 4 and info["relative_change"] == 0


@pytest.mark.parametrize("lam", [0.5, 4.0, 1e3, 1e9])
def test_an_update_inside_the_subspace_is_kept_for_any_lam(lam):
    _, a, d = random_problem(8, 15, 8, 3)
    u_k = csulora_subspace(d, 0.9)
    assert u_k.shape[1] >= 3
    b = u_k @ torch.randn(u_k.shape[1], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    b_new, info = csulora_b(b, a, u_k, lam)
    torch.testing.assert_close(b_new, b, rtol=0, atol=1e-10)
    assert info["fully_aligned"] == 3 and info["off_subspace"] == 0


@pytest.mark.parametrize("lam", [0.5, 4.0, 1e3])
def test_an_update_orthogonal_to_the_subspace_is_removed(lam):
    """rho_j = 0: lambda_j = lam / eps, so c_j = 1 / (1 + lam / eps) ~ eps / lam."""
    _, a, d = random_problem(9, 15, 8, 3)
    u_k = csulora_subspace(d, 0.5)
    raw = torch.randn(15, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    b = raw - u_k @ (u_k.T @ raw)
    b_new, info = csulora_b(b, a, u_k, lam)
    assert float(torch.linalg.norm(b_new)) <= 1e-9 * float(torch.linalg.norm(b))
    assert info["off_subspace"] == 3 and info["relative_change"] == pytest.approx(1.0)


@pytest.mark.parametrize("theta,lam", [(0.3, 4.0), (math.pi / 4, 1.0), (1.2, 16.0)])
def test_a_partly_aligned_direction_keeps_its_inside_part_and_shrinks_the_rest_by_hand(theta, lam):
    """D's energy lies 0.9996 on e1, so U_k = e1 at energy 0.9; the rank-1 update along
    u = cos(t) e1 + sin(t) e2 has rho = cos^2(t), lambda = lam tan^2(t), and its column becomes
    cos(t) e1 + sin(t) e2 / (1 + lam tan^2(t))."""
    e = torch.eye(6, dtype=torch.float64)
    f = torch.eye(5, dtype=torch.float64)
    d = 5 * torch.outer(e[0], f[0]) + 0.1 * torch.outer(e[1], f[1])
    u_k = csulora_subspace(d, 0.9)
    assert u_k.shape == (6, 1)
    b = (math.cos(theta) * e[0] + math.sin(theta) * e[1])[:, None] * 2.5
    a = torch.tensor([[0.3, -1.0, 0.2, 0.0, 0.5]], dtype=torch.float64)
    b_new, info = csulora_b(b, a, u_k, lam)
    want = 2.5 * (math.cos(theta) * e[0] + math.sin(theta) * e[1] / (1 + lam * math.tan(theta) ** 2))
    torch.testing.assert_close(b_new[:, 0], want, rtol=0, atol=1e-12)
    assert info["rho"][0] == pytest.approx(math.cos(theta) ** 2)
    assert info["partially_aligned"] == 1


def test_the_aligned_part_is_preserved_and_the_rest_shrinks_as_lam_grows():
    b, a, d = random_problem(10, 14, 11, 5)
    u_k = csulora_subspace(d, 0.6)
    P = u_k @ u_k.T
    off = []
    for lam in (0.0, 0.5, 2.0, 8.0, 64.0):
        dw = csulora_b(b, a, u_k, lam)[0] @ a
        torch.testing.assert_close(P @ dw, P @ b @ a, rtol=0, atol=1e-10)
        off.append(float(torch.linalg.norm(dw - P @ dw)))
    assert all(x > y for x, y in zip(off, off[1:]))


def test_energy_picks_the_fewest_directions_holding_the_share():
    d = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64))  # energies 9, 4, 1, 0.25 of 14.25
    assert [csulora_subspace(d, e).shape[1] for e in (0.5, 0.63, 0.64, 0.95, 0.99, 1.0)] == [1, 1, 2, 3, 4, 4]
    assert csulora_subspace(torch.zeros(4, 3), 0.9).shape == (4, 0)


def test_the_written_adapter_loads_in_peft_and_holds_the_dense_solution(llama_trio, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mscp.core.adapter import Adapter
    from mscp.core.checkpoint import Checkpoint

    out = tmp_path / "csu"
    rep = csulora(llama_trio["base"], llama_trio["aligned"], llama_trio["adapter"], out, energy=0.9, lam=4.0)
    src = load_file(str(llama_trio["adapter"] / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter_model.safetensors"))
    assert set(got) == set(src)
    ad = Adapter.load(llama_trio["adapter"])
    for m in ad.modules.values():
        assert torch.equal(got[m.key_a], src[m.key_a])  # lora_A kept
    assert rep["changed"] == sorted(k for k in src if k.endswith("lora_B.weight") and not torch.equal(got[k], src[k]))
    assert rep["n_modules"] > 0
    # the one edit-fraction rule: changed rows of B x r over all LoRA parameters (A and B)
    by_b = ad.by_b_key()
    rows = {k: int((got[k] != src[k]).any(dim=1).sum()) for k in rep["changed"]}
    assert rep["edited_parameters"] == sum(n * by_b[k].rank for k, n in rows.items())
    assert rep["edit_fraction"] == pytest.approx(rep["edited_parameters"] / ad.n_parameters())
    assert all(rep["modules"][k]["changed_rows"] == n for k, n in rows.items())

    key = rep["changed"][0]  # one module against the dense reference
    m = by_b[key]
    base, aligned = (Checkpoint(llama_trio[n]) for n in ("base", "aligned"))  # the trio is sharded
    d = aligned.get(m.weight_key).double() - base.get(m.weight_key).double()
    want, _, _ = dense_reference(src[m.key_b], src[m.key_a], m.scale, d, 0.9, 4.0)
    torch.testing.assert_close(m.scale * got[key].double() @ src[m.key_a].double(), want, rtol=1e-4, atol=1e-6)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(llama_trio["aligned"])), str(out))
    module = model.get_submodule(key.removesuffix(".lora_B.weight"))
    torch.testing.assert_close(module.lora_B["default"].weight.detach(), got[key])
    assert (out / "baseline_report.json").is_file()


def test_lam_zero_writes_the_adapter_unchanged(llama_trio, tmp_path):
    rep = csulora(llama_trio["base"], llama_trio["aligned"], llama_trio["adapter"], tmp_path / "same", lam=0.0)
    src = load_file(str(llama_trio["adapter"] / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "same" / "adapter_model.safetensors"))
    assert all(torch.equal(got[k], src[k]) for k in src)
    assert rep["edit_fraction"] == 0 and rep["changed"] == []


@pytest.mark.parametrize("kwargs,message", [(dict(energy=0.0), "energy must be a fraction"),
                                            (dict(energy=1.5), "energy must be a fraction"),
                                            (dict(lam=-1.0), "lam must be a finite number"),
                                            (dict(lam=float("inf")), "lam must be a finite number")])
def test_bad_parameters_are_refused_before_any_work(kwargs, message, tmp_path):
    with pytest.raises(MSCPError, match=message):
        csulora(tmp_path / "no-base", tmp_path / "no-aligned", tmp_path / "no-adapter", tmp_path / "out", **kwargs)


def test_it_is_a_registered_method_with_a_grid_and_a_demo_row():
    from mscp.harness import demo, methods, pareto

    assert methods.METHODS["csulora"].params == ("energy", "lam")
    for params in pareto.GRID["csulora"]:
        methods.resolve("csulora", params)
    assert "csulora" in demo.METHODS and demo.BASELINES["csulora"][0] == "csulora"
    assert baselines.CSULORA_ENERGY == 0.9 and baselines.CSULORA_LAM == 4.0  # the documented defaults
