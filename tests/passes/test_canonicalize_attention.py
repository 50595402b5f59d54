"""canonicalize_attention: every attention form HF models produce becomes one ``zycompile::attention``.

Graphs are captured with a recording Dynamo backend, the pass is applied directly, and the ops before
and after, the match count and the numerics are checked. Negative tests pin the cases where a rewrite
would change the math. The op itself is checked against ``reference_attention`` and with ``opcheck``.
"""

from __future__ import annotations

import operator

import expecttest
import pytest
import torch
import torch.nn.functional as F

import zycompile.ops  # noqa: F401  (registers zycompile::attention)
from zycompile.backend import ZyBackend
from zycompile.ops.attention import reference_attention
from zycompile.passes import PassContext
from zycompile.passes.canonicalize_attention import CanonicalizeAttentionPass
from zycompile.recipe import load_recipe

ATTN = torch.ops.zycompile.attention.default
SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
MATMUL = (torch.matmul, operator.matmul)
SOFTMAX = (F.softmax, torch.softmax)
RECIPE = load_recipe({"passes": ["canonicalize_attention"], "lowering": {"backend": "aot_eager"}})
B, HQ, HKV, T, D = 2, 4, 2, 8, 16


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---- helpers ----------------------------------------------------------------------------------------


def capture(fn, *args):
    """(gm, example_inputs) of the one graph Dynamo hands a backend for ``fn(*args)``."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(fn, backend=record, dynamic=False, fullgraph=True)(*args)
    assert len(graphs) == 1
    return graphs[0]


def apply_pass(gm, example_inputs, recipe=RECIPE):
    opts = recipe.pass_spec("canonicalize_attention").options
    return CanonicalizeAttentionPass(opts, PassContext(recipe, example_inputs))(gm)


def count(gm, *targets) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


def count_method(gm, *names) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_method" and n.target in names)


def ops(gm) -> dict[str, int]:
    return {
        "sdpa": count(gm, *SDPA),
        "matmul": count(gm, *MATMUL) + count_method(gm, "matmul"),
        "softmax": count(gm, *SOFTMAX) + count_method(gm, "softmax"),
        "expand": count_method(gm, "expand"),
        "attention": count(gm, ATTN),
    }


def run(gm, example_inputs):
    with torch.no_grad():
        return gm(*example_inputs)


def rewrite(fn, *args, matches=1):
    """Capture ``fn``, apply the pass, check the match count and that the outputs are unchanged."""
    gm, ex = capture(fn, *args)
    before_ops = ops(gm)
    expected = run(gm, ex)
    result = apply_pass(gm, ex)
    assert result.matches == matches, result.notes
    assert result.modified == (matches > 0)
    torch.testing.assert_close(run(gm, ex), expected)
    return gm, before_ops, ops(gm), result


def refused(fn, *args):
    """The pass must not fire: 0 matches and the graph code is untouched."""
    gm, ex = capture(fn, *args)
    code = gm.code
    expected = run(gm, ex)
    result = apply_pass(gm, ex)
    assert result.matches == 0 and not result.modified
    assert gm.code == code
    assert count(gm, ATTN) == 0
    torch.testing.assert_close(run(gm, ex), expected)
    return result


def qkv(hq=HQ, hkv=HKV, tq=T, tk=T, b=B, d=D):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(b, hq, tq, d, generator=g),
        torch.randn(b, hkv, tk, d, generator=g),
        torch.randn(b, hkv, tk, d, generator=g),
    )


def causal_additive_mask(tq=T, tk=T):
    keep = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
    return torch.zeros(1, 1, tq, tk).masked_fill(~keep, torch.finfo(torch.float32).min)


def repeat_kv(x, n: int):
    """HF's repeat_kv, verbatim."""
    b, h, t, d = x.shape
    if n == 1:
        return x
    x = x[:, :, None, :, :].expand(b, h, n, t, d)
    return x.reshape(b, h * n, t, d)


def eager_attention(q, k, v, mask, scale=D**-0.5, dropout=0.0, training=False):
    """HF's eager_attention_forward: matmul → mul(scale) → add(mask) → softmax(fp32) → to → dropout → matmul."""
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    v = repeat_kv(v, q.shape[1] // v.shape[1])
    w = torch.matmul(q, k.transpose(2, 3)) * scale
    if mask is not None:
        w = w + mask
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    w = F.dropout(w, p=dropout, training=training)
    return torch.matmul(w, v)


# ---- positive forms ---------------------------------------------------------------------------------


def test_sdpa_without_gqa():
    q, k, v = qkv(hkv=HQ)
    gm, before, after, _ = rewrite(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v)
    assert before["sdpa"] == 1 and before["attention"] == 0
    assert after["sdpa"] == 0 and after["attention"] == 1
    (node,) = [n for n in gm.graph.nodes if n.target is ATTN]
    assert node.args[3:] == (None, D**-0.5, False)  # default scale made explicit


def test_sdpa_enable_gqa_with_causal():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    gm, before, after, _ = rewrite(fn, *qkv())
    assert (before["sdpa"], after["sdpa"], after["attention"]) == (1, 0, 1)
    (node,) = [n for n in gm.graph.nodes if n.target is ATTN]
    assert node.args[5] is True  # Tq == Tk: causal kept, and equal to SDPA's rule


def test_repeat_kv_then_sdpa_drops_the_copies():
    def fn(q, k, v, mask):
        return F.scaled_dot_product_attention(
            q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=mask, dropout_p=0.0, scale=0.25
        )

    gm, before, after, _ = rewrite(fn, *qkv(), causal_additive_mask())
    assert before["expand"] == 2 and before["sdpa"] == 1
    assert after == {"sdpa": 0, "matmul": 0, "softmax": 0, "expand": 0, "attention": 1}
    # The op reads the un-repeated [B, Hkv, T, D] k/v placeholders directly.
    (node,) = [n for n in gm.graph.nodes if n.target is ATTN]
    k_arg, v_arg = node.args[1], node.args[2]
    assert k_arg.op == v_arg.op == "placeholder"
    assert node.args[4] == 0.25


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "nomask"])
def test_eager_chain(with_mask):
    mask = causal_additive_mask() if with_mask else None
    if with_mask:
        gm, before, after, _ = rewrite(eager_attention, *qkv(), mask)
    else:
        gm, before, after, _ = rewrite(lambda q, k, v: eager_attention(q, k, v, None), *qkv())
    assert (before["matmul"], before["softmax"], before["expand"]) == (2, 1, 2)
    assert after == {"sdpa": 0, "matmul": 0, "softmax": 0, "expand": 0, "attention": 1}
    assert count(gm, F.dropout) == 0 and count(gm, operator.mul) == 0
    (node,) = [n for n in gm.graph.nodes if n.target is ATTN]
    assert node.args[4] == pytest.approx(D**-0.5)
    assert (node.args[3] is not None) == with_mask


def test_eager_chain_with_division_scale():
    def fn(q, k, v):
        w = torch.matmul(q, k.transpose(-1, -2)) / 4.0
        return torch.matmul(w.softmax(-1), v)

    q, k, v = qkv(hkv=HQ)
    gm, _, after, _ = rewrite(fn, q, k, v)
    assert after["attention"] == 1
    (node,) = [n for n in gm.graph.nodes if n.target is ATTN]
    assert node.args[4] == 0.25


def test_eager_dropout_noop_in_training_false():
    gm, _, after, _ = rewrite(
        lambda q, k, v: eager_attention(q, k, v, None, dropout=0.1, training=False), *qkv()
    )
    assert after["attention"] == 1


def test_k_repeated_but_v_not():
    """Only k is repeat_kv'd (v already has Hq heads): un-repeating k alone would break the op's contract
    (k and v with the same Hkv), so both keep their repeated form."""

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, repeat_kv(k, 2), v)

    q, k, _ = qkv()
    v = torch.randn(B, HQ, T, D)
    gm, _, after, _ = rewrite(fn, q, k, v)
    assert after["attention"] == 1
    (node,) = [n for n in gm.graph.nodes if n.target is ATTN]
    assert node.args[1].meta["example_value"].shape[1] == node.args[2].meta["example_value"].shape[1] == HQ


def test_repeated_q_is_not_unrepeated():
    """Regression: q, k and v all repeat_kv'd by 2 → the op must still produce Hq output heads
    (un-repeating q shrank the output to [B, Hq/2, T, D])."""

    def fn(q, k, v):
        return F.scaled_dot_product_attention(repeat_kv(q, 2), repeat_kv(k, 2), repeat_kv(v, 2))

    q, k, v = qkv(hq=HKV)
    gm, _, after, _ = rewrite(fn, q, k, v)  # also checks the output (and its shape) is unchanged
    assert after["attention"] == 1
    (node,) = [n for n in gm.graph.nodes if n.target is ATTN]
    assert node.meta["example_value"].shape == (B, 2 * HKV, T, D)


# ---- HF Llama, through the backend -------------------------------------------------------------------


class RecordingZyBackend(ZyBackend):
    """ZyBackend that keeps the op counts of each graph before and after its pre-grad passes."""

    def __init__(self, recipe):
        super().__init__(recipe)
        self.before: list[dict[str, int]] = []
        self.after: list[dict[str, int]] = []

    def __call__(self, gm, example_inputs):
        self.before.append(ops(gm))
        compiled = super().__call__(gm, example_inputs)  # pre-grad passes mutate gm in place
        self.after.append(ops(gm))
        return compiled


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hf_llama(impl):
    from zycompile.models import load_model

    model = load_model("tiny:llama").model
    model.config._attn_implementation = impl
    layers = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        backend = RecordingZyBackend(RECIPE)
        got = torch.compile(model, backend=backend, dynamic=False)(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, expected)
    assert backend.report.matches("canonicalize_attention") == layers
    assert backend.report.warnings == []
    (before,), (after,) = backend.before, backend.after
    if impl == "sdpa":
        assert before["sdpa"] == layers
    else:
        assert (before["matmul"], before["softmax"]) == (2 * layers, layers)
    assert after["attention"] == layers
    assert after["sdpa"] == after["matmul"] == after["softmax"] == 0


# ---- negative: the pass must not fire ----------------------------------------------------------------


def test_softmax_over_dim_minus_2_is_not_attention():
    def fn(q, k, v):
        w = torch.matmul(q, k.transpose(2, 3)) * 0.25
        return torch.matmul(F.softmax(w, dim=-2), v)

    result = refused(fn, *qkv(hkv=HQ))
    assert any("softmax over dim -2" in n for n in result.notes)


def test_dropout_in_training_is_not_rewritten():
    gm, ex = capture(lambda q, k, v: eager_attention(q, k, v, None, dropout=0.1, training=True), *qkv())
    assert apply_pass(gm, ex).matches == 0 and count(gm, ATTN) == 0
    gm, ex = capture(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1), *qkv(hkv=HQ))
    result = apply_pass(gm, ex)
    assert result.matches == 0 and count(gm, *SDPA) == 1
    assert any("dropout_p=0.1" in n for n in result.notes)


def test_attention_weights_used_elsewhere():
    def fn(q, k, v):  # output_attentions=True: the probabilities are returned too
        w = F.softmax(torch.matmul(q, k.transpose(2, 3)) * 0.25, dim=-1, dtype=torch.float32)
        return torch.matmul(w, v), w

    result = refused(fn, *qkv(hkv=HQ))
    assert any("read elsewhere" in n for n in result.notes)


def test_scores_scaled_by_a_tensor():
    def fn(q, k, v, scale):
        w = torch.matmul(q, k.transpose(2, 3)) * scale
        return torch.matmul(w.softmax(dim=-1), v)

    result = refused(fn, *qkv(hkv=HQ), torch.tensor(0.25))
    assert any("scaled by a tensor" in n for n in result.notes)


def test_is_causal_with_tq_ne_tk():
    """SDPA's is_causal is top-left aligned; the op's is bottom-right: they differ when Tq != Tk."""
    q, k, v = qkv(hkv=HQ, tq=1, tk=8)
    result = refused(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v)
    assert any("Tq != Tk" in n for n in result.notes)


def test_three_d_inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B * HQ, T, D, generator=g) for _ in range(3))
    result = refused(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v)
    assert any("4-D" in n for n in result.notes)


def test_autograd_recording_is_not_rewritten():
    """Regression: zycompile::attention has no autograd formula, so a graph that needs gradients
    through attention keeps SDPA (AOT used to fail tracing the backward)."""

    def fn(q, k, v):
        return F.scaled_dot_product_attention(repeat_kv(q, 1), repeat_kv(k, 2), repeat_kv(v, 2))

    q, k, v = (t.requires_grad_() for t in qkv())
    expected = fn(q, k, v)
    (want,) = torch.autograd.grad(expected.sum(), q)
    backend = ZyBackend(RECIPE)
    got = torch.compile(fn, backend=backend, dynamic=False)(q, k, v)
    (grad,) = torch.autograd.grad(got.sum(), q)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grad, want)
    assert backend.report.matches("canonicalize_attention") == 0
    (record,) = backend.report.passes
    assert any("autograd is recording" in n for n in record.notes)


# ---- the rewritten graph, locked -----------------------------------------------------------------------


class TestRewrittenGraph(expecttest.TestCase):
    def setUp(self):
        torch._dynamo.reset()

    def test_repeat_kv_sdpa_graph(self):
        def fn(q, k, v, mask):
            return F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=mask)

        gm, ex = capture(fn, *qkv(b=1), causal_additive_mask())
        self.assertEqual(apply_pass(gm, ex).matches, 1)
        code = "\n".join(line.rstrip() for line in gm.code.strip().splitlines() if line.strip())
        self.assertExpectedInline(
            code,
            """\
def forward(self, L_k_ : torch.Tensor, L_v_ : torch.Tensor, L_q_ : torch.Tensor, L_mask_ : torch.Tensor):
    l_k_ = L_k_
    l_v_ = L_v_
    l_q_ = L_q_
    l_mask_ = L_mask_
    attention_default = torch.ops.zycompile.attention.default(l_q_, l_k_, l_v_, l_mask_, 0.25, False);  l_q_ = l_k_ = l_v_ = l_mask_ = None
    return (attention_default,)""",
        )


# ---- the op -----------------------------------------------------------------------------------------


def _bool_mask(tq, tk, b=B):
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(b, 1, tq, tk, generator=g) > 0.4
    mask[..., -1] = True  # every query row keeps at least one key
    return mask


OP_CASES = {
    "gqa": dict(shape=(HQ, HKV, T, T), mask=None, causal=False),
    "mha_dv32": dict(shape=(HQ, HQ, T, T), mask=None, causal=False, dv=32),
    "bool_mask": dict(shape=(HQ, HKV, T, T), mask="bool", causal=False),
    "additive_mask": dict(shape=(HQ, HKV, T, T), mask="add", causal=False),
    "causal_square": dict(shape=(HQ, HKV, T, T), mask=None, causal=True),
    "causal_tq_lt_tk": dict(shape=(HQ, HKV, 3, 7), mask=None, causal=True),
    "causal_decode_1": dict(shape=(HQ, HKV, 1, 7), mask=None, causal=True),
    "causal_tq_lt_tk_bool": dict(shape=(HQ, HKV, 3, 7), mask="bool", causal=True),
    "causal_tq_lt_tk_add": dict(shape=(HQ, HKV, 3, 7), mask="add", causal=True),
}


def _op_inputs(shape, mask, causal, dv=D):
    hq, hkv, tq, tk = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, hq, tq, D, generator=g)
    k = torch.randn(B, hkv, tk, D, generator=g)
    v = torch.randn(B, hkv, tk, dv, generator=g)
    m = None
    if mask == "bool":
        m = _bool_mask(tq, tk)
    elif mask == "add":
        m = torch.randn(B, 1, tq, tk, generator=g)
    return q, k, v, m, 0.3, causal


@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_matches_reference(case):
    q, k, v, mask, scale, causal = _op_inputs(**OP_CASES[case])
    got = torch.ops.zycompile.attention(q, k, v, mask, scale, causal)
    want = reference_attention(q, k, v, mask, scale, causal)
    assert got.shape == (*q.shape[:-1], v.shape[-1]) and got.is_contiguous()
    torch.testing.assert_close(got, want)


def test_op_causal_is_bottom_right_aligned():
    """Query i of Tq sees keys j <= i + (Tk - Tq): the last query sees every key (a KV-cache decode)."""
    q, k, v, *_ = _op_inputs((HQ, HKV, 1, 7), None, True)
    torch.testing.assert_close(
        torch.ops.zycompile.attention(q, k, v, None, 0.3, True),
        torch.ops.zycompile.attention(q, k, v, None, 0.3, False),
    )


@pytest.mark.parametrize("case", ["gqa", "bool_mask", "causal_tq_lt_tk_add"])
def test_op_opcheck(case):
    torch.library.opcheck(torch.ops.zycompile.attention.default, _op_inputs(**OP_CASES[case]))
