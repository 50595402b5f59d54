"""fuse_projections: q/k/v and gate/up become one GEMM each, without a second copy of the weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zycompile
from zycompile.backend import ZyBackend
from zycompile.models import load_model
from zycompile.passes import fuse_projections as fp
from zycompile.recipe import load_recipe

AOT = ["lowering.backend=aot_eager"]
FUSE_ONLY = {"passes": ["fuse_projections"], "lowering": {"backend": "aot_eager"}}
LINEAR = (F.linear, torch._C._nn.linear)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _ids(n=8, vocab=512, seed=0):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _logits(fn, ids):
    with torch.no_grad():
        return fn(input_ids=ids, use_cache=False).logits


def storage_bytes(tensors) -> int:
    """Bytes held by the distinct storages behind ``tensors`` (views of one buffer count once)."""
    storages = {}
    for t in tensors:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def _assert_back_to_back(*params):
    ptr = params[0].untyped_storage().data_ptr()
    offset = params[0].storage_offset()
    for p in params:
        assert p.untyped_storage().data_ptr() == ptr
        assert p.storage_offset() == offset and p.is_contiguous()
        offset += p.numel()


class RecordingZyBackend(ZyBackend):
    """ZyBackend that counts F.linear nodes of each graph before and after its pre-grad passes."""

    def __init__(self, recipe):
        super().__init__(recipe)
        self.linears: list[tuple[int, int]] = []

    def __call__(self, gm, example_inputs):
        n = sum(1 for node in gm.graph.nodes if node.op == "call_function" and node.target in LINEAR)
        compiled = super().__call__(gm, example_inputs)
        m = sum(1 for node in gm.graph.nodes if node.op == "call_function" and node.target in LINEAR)
        self.linears.append((n, m))
        return compiled


# ---- tiny HF models ---------------------------------------------------------------------------------


def test_llama_qkv_and_gate_up_fused():
    model = load_model("tiny:llama").model
    layers = model.config.num_hidden_layers
    ids = _ids()
    expected = _logits(model, ids)
    opt = zycompile.optimize(model, "llama-tiny", overrides=AOT)
    torch.testing.assert_close(_logits(opt, ids), expected)
    report = opt.compile_report()
    print(f"\nfuse_projections matches on tiny:llama ({layers} layers): {report.matches('fuse_projections')}")
    assert report.matches("fuse_projections") == 2 * layers  # q/k/v and gate/up, per layer
    assert report.warnings == []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _assert_back_to_back(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
        _assert_back_to_back(mlp.gate_proj.weight, mlp.up_proj.weight)


def test_llama_graph_has_fewer_linears():
    model = load_model("tiny:llama").model
    layers = model.config.num_hidden_layers
    recipe = load_recipe("llama-tiny", AOT)
    fp.prepare_model(model)
    backend = RecordingZyBackend(recipe)
    ids = _ids()
    expected = _logits(model, ids)
    torch.testing.assert_close(_logits(torch.compile(model, backend=backend, dynamic=False), ids), expected)
    # q, k, v, o, gate, up, down per layer + lm_head → fused qkv, o, fused gate_up, down + lm_head
    assert backend.linears == [(7 * layers + 1, 4 * layers + 1)]


def test_no_second_copy_of_the_weights(monkeypatch):
    model = load_model("tiny:llama").model
    before = storage_bytes(model.parameters())
    fused_buffers = []
    real_storage_view = fp.storage_view

    def recording_storage_view(parts):
        out = real_storage_view(parts)
        fused_buffers.append(out)
        return out

    monkeypatch.setattr(fp, "storage_view", recording_storage_view)
    opt = zycompile.optimize(model, "llama-tiny", overrides=AOT)
    _logits(opt, _ids())
    layers = model.config.num_hidden_layers
    assert opt.compile_report().matches("fuse_projections") == 2 * layers
    assert len(fused_buffers) >= 2 * layers  # the graph constants the pass added
    params = list(model.parameters())
    assert storage_bytes(params + fused_buffers) == before
    # Every fused buffer is a view of parameter storage, not a copy.
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    assert {b.untyped_storage().data_ptr() for b in fused_buffers} <= param_storages
    attn = model.model.layers[0].self_attn
    q = attn.q_proj.weight
    rows = q.shape[0] + attn.k_proj.weight.shape[0] + attn.v_proj.weight.shape[0]
    assert any(
        b.shape == (rows, q.shape[1]) and b.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()
        for b in fused_buffers
    )


def test_load_state_dict_after_compile_reaches_the_fused_buffer():
    model = load_model("tiny:llama").model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        other = type(model)(model.config).eval()  # same architecture, other weights
    ids = _ids()
    opt = zycompile.optimize(model, "llama-tiny", overrides=AOT)
    first = _logits(opt, ids)
    expected = _logits(other, ids)
    assert not torch.allclose(first, expected)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(_logits(opt, ids), expected)
    attn = model.model.layers[0].self_attn
    _assert_back_to_back(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)


def test_qwen2_biases_fused():
    model = load_model("tiny:qwen2").model
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None
    ids = _ids()
    expected = _logits(model, ids)
    opt = zycompile.optimize(model, "llama-tiny", overrides=AOT)
    torch.testing.assert_close(_logits(opt, ids), expected)
    layers = model.config.num_hidden_layers
    assert opt.compile_report().matches("fuse_projections") == 2 * layers
    for layer in model.model.layers:
        a = layer.self_attn
        _assert_back_to_back(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)
        _assert_back_to_back(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias)


# ---- negative ---------------------------------------------------------------------------------------


def test_plain_torch_compile_does_not_fuse(caplog):
    """Without optimize() the weights are separate tensors: fusing would copy them, so the pass refuses."""
    model = load_model("tiny:llama").model
    ids = _ids()
    expected = _logits(model, ids)
    backend = ZyBackend(load_recipe("llama-tiny", AOT + ["debug.strict=false"]))
    torch.testing.assert_close(_logits(torch.compile(model, backend=backend, dynamic=False), ids), expected)
    assert backend.report.matches("fuse_projections") == 0
    notes = [n for r in backend.report.passes if r.name == "fuse_projections" for n in r.notes]
    assert notes and all("not laid out back to back" in n for n in notes)
    assert any("fuse_projections" in w for w in backend.report.warnings)
    q, k = model.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.k_proj.weight
    assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()

    # The same through the registered entry point.
    torch._dynamo.reset()
    options = {"recipe": "llama-tiny", "overrides": AOT + ["debug.strict=false"]}
    with caplog.at_level("WARNING", logger="zycompile"):
        got = _logits(torch.compile(model, backend="zycompile", options=options, dynamic=False), ids)
    torch.testing.assert_close(got, expected)
    assert any("fuse_projections" in r.message and "back to back" in r.message for r in caplog.records)


def test_optimize_freezes_weights_so_grad_mode_still_fuses():
    """optimize() is a serving compile: weights stop requiring grad, so grad mode records nothing."""
    model = load_model("tiny:llama").model
    ids = _ids()
    expected = _logits(model, ids)
    opt = zycompile.optimize(model, "llama-tiny", overrides=AOT + ["debug.strict=false"])
    assert not any(p.requires_grad for p in model.parameters())
    got = opt(input_ids=ids, use_cache=False).logits  # grad mode on
    torch.testing.assert_close(got, expected)
    report = opt.compile_report()
    assert report.matches("fuse_projections") == 4 and report.matches("canonicalize_attention") == 2


def test_autograd_recording_refuses():
    """With trainable weights and autograd on, both passes leave the graph alone and say why."""
    model = load_model("tiny:llama").model
    ids = _ids()
    expected = _logits(model, ids)
    recipe = zycompile.load_recipe("llama-tiny", AOT + ["debug.strict=false"])
    model.eval()
    from zycompile.passes.fuse_projections import prepare_model

    prepare_model(model)  # weights laid out, but still trainable
    backend = ZyBackend(recipe)
    got = torch.compile(model, backend=backend, dynamic=False)(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got.detach(), expected)
    for name in ("fuse_projections", "canonicalize_attention"):
        assert backend.report.matches(name) == 0
        notes = [n for r in backend.report.passes if r.name == name for n in r.notes]
        assert notes and all("autograd is recording" in n for n in notes)


class Toy(nn.Module):
    """Two linears reading the same input, behind an HF-like ``forward(input_ids, use_cache)``."""

    def __init__(self, a: nn.Linear, b: nn.Linear, b_reads_slice: bool = False):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.a, self.b = a, b
        self.b_reads_slice = b_reads_slice

    def forward(self, input_ids, use_cache=False):
        x = self.emb(input_ids)
        y = self.b(x[..., : self.b.in_features] if self.b_reads_slice else x)
        return torch.cat([self.a(x), y], dim=-1)


def _toy_run(toy):
    ids = torch.randint(0, 32, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = toy(ids)
        opt = zycompile.optimize(toy, FUSE_ONLY)
        torch.testing.assert_close(opt(ids), expected)
    return opt.compile_report()


def test_toy_same_shape_is_fused():
    torch.manual_seed(0)
    report = _toy_run(Toy(nn.Linear(16, 8), nn.Linear(16, 24)))
    assert report.matches("fuse_projections") == 1


def test_mixed_bias_not_fused():
    torch.manual_seed(0)
    toy = Toy(nn.Linear(16, 8, bias=True), nn.Linear(16, 8, bias=False))
    assert fp.prepare_model(toy) == 0
    # Even when the weights are laid out back to back by hand, the pass refuses the mix.
    fp.fuse_storage([toy.a.weight, toy.b.weight])
    report = _toy_run(toy)
    assert report.matches("fuse_projections") == 0
    notes = [n for r in report.passes for n in r.notes]
    assert any("bias and others not" in n for n in notes)


def test_different_in_features_not_fused():
    torch.manual_seed(0)
    toy = Toy(nn.Linear(16, 8), nn.Linear(8, 8), b_reads_slice=True)
    assert fp.prepare_model(toy) == 0  # they do not read the same tensor
    report = _toy_run(toy)
    assert report.matches("fuse_projections") == 0
    # And the refusal rule itself, for weights that would share an input.
    reason = fp._refusal([torch.zeros(8, 16), torch.zeros(8, 32)], [None, None], {})
    assert reason is not None and "in_features" in reason
