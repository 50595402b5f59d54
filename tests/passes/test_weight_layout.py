"""weight_layout: K-major linear weights, same values and outputs, one copy, kept by fuse_projections."""

from __future__ import annotations

import torch

import zycompile
from zycompile.models import load_model
from zycompile.passes.fuse_projections import _k_major

AOT = ["lowering.backend=aot_eager"]
WITH_LAYOUT = {"passes": ["canonicalize_attention", "weight_layout", "fuse_projections"]}


def _storage_bytes(model) -> int:
    seen = {}
    for p in model.parameters():
        s = p.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def test_weights_become_k_major_with_same_values_and_outputs():
    torch._dynamo.reset()
    model = load_model("tiny:llama").model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    nbytes = _storage_bytes(model)
    opt = zycompile.optimize(model, {**WITH_LAYOUT, "model": {"source": "tiny:llama"}}, overrides=AOT)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(_k_major(m.weight) for m in linears)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert _storage_bytes(model) == nbytes  # re-laid and fused, never duplicated
    with torch.no_grad():
        torch.testing.assert_close(opt(ids).logits, expected, rtol=1e-5, atol=1e-5)
    report = opt.compile_report()
    assert report.matches("fuse_projections") == 4
    assert report.matches("weight_layout") > 0  # the graph's linears read K-major weights
