"""PassManager and ZyBackend: dumps, no-match warnings, post-grad passes, cache uuids, entry point, breaks."""

from __future__ import annotations

import dataclasses
import importlib.metadata

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zycompile
from zycompile.backend import ZyBackend, zycompile_backend
from zycompile.errors import RecipeError
from zycompile.lowering.inductor import PostGradHook
from zycompile.passes import PASS_REGISTRY, GraphPass, PassContext, PassResult, register_pass
from zycompile.pipeline import PassManager
from zycompile.recipe import load_recipe
from zycompile.report import CompileReport

ATTN = torch.ops.zycompile.attention.default


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class ToyAttention(nn.Module):
    """One attention block behind an HF-like ``forward(input_ids, use_cache)``: both passes match once."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(64, dim)
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, input_ids, use_cache=False):
        x = self.emb(input_ids)
        b, t, d = x.shape

        def split(y):
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True
        )
        return self.o(a.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _toy():
    torch.manual_seed(0)
    return ToyAttention().eval(), torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))


def _recipe(passes, backend="aot_eager", **extra):
    return load_recipe(
        {"passes": passes, "lowering": {"backend": backend, **extra.pop("lowering", {})}, **extra}
    )


def _raised(excinfo, cls):
    """The exception or one of its causes (Dynamo wraps backend errors in BackendCompilerFailed)."""
    e = excinfo.value
    while e is not None:
        if isinstance(e, cls):
            return e
        e = e.__cause__ or getattr(e, "inner_exception", None)
    return None


# ---- dumps, warnings, strict -----------------------------------------------------------------------


def test_dump_dir_gets_before_and_after_per_pass(tmp_path):
    toy, ids = _toy()
    opt = zycompile.optimize(
        toy, _recipe(["canonicalize_attention", "fuse_projections"], debug={"dump_dir": str(tmp_path)})
    )
    with torch.no_grad():
        torch.testing.assert_close(opt(ids), toy(ids))
    assert opt.compile_report().matches("canonicalize_attention") == 1
    assert opt.compile_report().matches("fuse_projections") == 1
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "graph0_pre_grad_00_canonicalize_attention_after.txt",
        "graph0_pre_grad_00_canonicalize_attention_before.txt",
        "graph0_pre_grad_01_fuse_projections_after.txt",
        "graph0_pre_grad_01_fuse_projections_before.txt",
    ]
    before = (tmp_path / "graph0_pre_grad_00_canonicalize_attention_before.txt").read_text()
    after = (tmp_path / "graph0_pre_grad_00_canonicalize_attention_after.txt").read_text()
    sdpa, op = "torch._C._nn.scaled_dot_product_attention(", "torch.ops.zycompile.attention.default("
    assert sdpa in before and op not in before
    assert sdpa not in after and op in after
    fused = (tmp_path / "graph0_pre_grad_01_fuse_projections_after.txt").read_text()
    assert "_zy_fused_0" in fused and "split(linear" in fused


def test_no_match_warns_and_strict_raises():
    x = torch.randn(2, 16)
    mlp = MLP().eval()
    backend = ZyBackend(_recipe(["canonicalize_attention"]))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(mlp, backend=backend)(x), mlp(x))
    (warning,) = backend.report.warnings
    assert "canonicalize_attention" in warning and "matched nothing" in warning

    torch._dynamo.reset()
    strict = ZyBackend(_recipe(["canonicalize_attention"], debug={"strict": True}))
    with pytest.raises(Exception) as excinfo, torch.no_grad():
        torch.compile(mlp, backend=strict)(x)
    err = _raised(excinfo, RecipeError)
    assert err is not None and "canonicalize_attention" in str(err) and "debug.strict" in str(err)


# ---- post-grad passes -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SwapOptions:
    marker: int = 0  # only there to change the pass's uuid


class ReluToAbsPass(GraphPass):
    """Test-only post-grad pass: aten.relu → aten.abs (an observable change), counting the rewrites."""

    name = "test_relu_to_abs"
    stage = "post_grad"
    Options = SwapOptions
    calls: list[str] = []

    def __call__(self, gm):
        aten = torch.ops.aten
        ReluToAbsPass.calls.append(type(gm).__name__)
        n = 0
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is aten.relu.default:
                node.target = aten.abs.default
                n += 1
        if n:
            gm.recompile()
        return PassResult(modified=n > 0, matches=n)


@pytest.fixture
def relu_to_abs():
    register_pass(ReluToAbsPass)
    ReluToAbsPass.calls.clear()
    yield ReluToAbsPass
    PASS_REGISTRY.pop(ReluToAbsPass.name, None)
    ReluToAbsPass.calls.clear()


def _expected_abs(mlp, x):
    with torch.no_grad():
        return mlp.down(torch.abs(mlp.up(x)))


def test_post_grad_pass_under_aot_eager(relu_to_abs):
    torch.manual_seed(0)
    mlp, x = MLP().eval(), torch.randn(4, 16)
    backend = ZyBackend(_recipe([relu_to_abs.name]))
    with torch.no_grad():
        got = torch.compile(mlp, backend=backend)(x)
    torch.testing.assert_close(got, _expected_abs(mlp, x))  # the rewrite reached the lowered graph
    assert not torch.allclose(got, mlp(x))
    assert backend.report.matches(relu_to_abs.name, stage="post_grad") == 1
    assert len(relu_to_abs.calls) == 1  # once, on the AOT forward graph


@pytest.mark.inductor
def test_post_grad_pass_under_inductor(relu_to_abs):
    torch.manual_seed(0)
    mlp, x = MLP().eval(), torch.randn(4, 16)
    # The FX graph cache is keyed by the hook's uuid; switch it off so the pass runs in this process.
    recipe = _recipe([relu_to_abs.name], backend="inductor", lowering={"options": {"fx_graph_cache": False}})
    backend = ZyBackend(recipe)
    with torch.no_grad():
        got = torch.compile(mlp, backend=backend)(x)
    torch.testing.assert_close(got, _expected_abs(mlp, x))
    assert backend.report.matches(relu_to_abs.name, stage="post_grad") == 1
    assert backend.report.graphs[0].lowering == "inductor"
    assert relu_to_abs.calls


def test_uuid_tracks_recipe_and_pass_options(relu_to_abs):
    def uuid(recipe, stage="post_grad"):
        return PassManager(recipe, stage, PassContext(recipe), CompileReport(recipe.compute_hash())).uuid()

    base = _recipe([relu_to_abs.name])
    assert uuid(base) == uuid(_recipe([relu_to_abs.name]))  # stable
    assert uuid(base) != uuid(_recipe([{"name": relu_to_abs.name, "marker": 1}]))  # pass option
    assert uuid(base) != uuid(_recipe([relu_to_abs.name], runtime={"max_seq_len": 4096}))  # recipe
    assert uuid(base, "pre_grad") != uuid(base, "post_grad")
    manager = PassManager(base, "post_grad", PassContext(base), CompileReport(base.compute_hash()))
    assert PostGradHook(manager).uuid() == manager.uuid()


# ---- entry point, graph breaks ---------------------------------------------------------------------


def test_entry_point_backend():
    (ep,) = [
        ep for ep in importlib.metadata.entry_points(group="torch_dynamo_backends") if ep.name == "zycompile"
    ]
    assert ep.value == "zycompile.backend:zycompile_backend"
    assert ep.load() is zycompile_backend
    assert "zycompile" in torch._dynamo.list_backends()

    toy, ids = _toy()
    options = {"recipe": {"passes": ["canonicalize_attention"], "lowering": {"backend": "aot_eager"}}}
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(toy, backend="zycompile", options=options)(ids), toy(ids))

    torch._dynamo.reset()
    with pytest.raises(Exception) as excinfo, torch.no_grad():
        torch.compile(toy, backend="zycompile", options={"recipe": "llama-tiny", "bogus": 1})(ids)
    err = _raised(excinfo, RecipeError)
    assert err is not None and "bogus" in str(err)


class Breaky(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        x = self.a(x).relu()
        if self.how == "print":
            print("zycompile-test: graph break here")
        else:
            torch._dynamo.graph_break()
        return self.b(x)


@pytest.mark.parametrize("how", ["graph_break", "print"])
def test_graph_breaks_are_counted(how):
    torch.manual_seed(0)
    m, x = Breaky(how).eval(), torch.randn(2, 8)
    backend = ZyBackend(_recipe([]))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, backend=backend)(x), m(x))
    assert len(backend.report.graphs) == 2
    assert sum(backend.report.graph_breaks.values()) >= 1
    assert "break" in backend.report.summary()
