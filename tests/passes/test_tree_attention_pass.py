"""tree_attention: zycompile::attention becomes split-KV (one device) or tree/ring (sharded KV) attention."""

from __future__ import annotations

import expecttest
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import zycompile.ops  # noqa: F401
from zycompile.errors import ZyError
from zycompile.ops.attention import attention, reference_attention
from zycompile.parallel import distributed
from zycompile.passes import PassContext
from zycompile.passes.canonicalize_attention import CanonicalizeAttentionPass
from zycompile.passes.tree_attention import TreeAttentionOptions, TreeAttentionPass
from zycompile.recipe import load_recipe

RECIPE = load_recipe({"lowering": {"backend": "aot_eager"}})


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def capture(fn, *args):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(fn, backend=record, dynamic=False, fullgraph=True)(*args)
    return graphs[0]


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def sdpa_block(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True) * 2


def inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1, 16, generator=g)
    k, v = torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 2, 40, 16, generator=g)
    mask = torch.arange(40)[None, None, None, :] < 33
    return q, k, v, mask


class TestTreeAttentionPass(expecttest.TestCase):
    def test_single_device_becomes_split_kv(self):
        q, k, v, mask = inputs()
        gm = capture(sdpa_block, q, k, v, mask)
        CanonicalizeAttentionPass(None, PassContext(RECIPE))(gm)
        res = TreeAttentionPass(TreeAttentionOptions(num_splits=4), PassContext(RECIPE))(gm)
        assert (res.matches, res.modified) == (1, True)
        ops = targets(gm)
        assert torch.ops.zycompile.split_kv_attention.default in ops
        assert torch.ops.zycompile.attention.default not in ops
        self.assertExpectedInline(
            gm.code.strip().split("\n", 1)[1].strip().replace("\n    ", "\n"),
            """\
l_q_ = L_q_
l_k_ = L_k_
l_v_ = L_v_
l_mask_ = L_mask_
split_kv_attention_default = torch.ops.zycompile.split_kv_attention.default(l_q_, l_k_, l_v_, l_mask_, 0.25, False, 4);  l_q_ = l_k_ = l_v_ = l_mask_ = None
getitem = split_kv_attention_default[0];  split_kv_attention_default = None
mul = getitem * 2;  getitem = None
return (mul,)""",
        )
        torch.testing.assert_close(gm(q, k, v, mask)[0], reference_attention(q, k, v, mask, 0.25) * 2)

    def test_no_attention_no_match(self):
        gm = capture(lambda x: x.softmax(-1) * 3, torch.randn(2, 5))
        res = TreeAttentionPass(TreeAttentionOptions(), PassContext(RECIPE))(gm)
        assert (res.matches, res.modified) == (0, False)


def _fake_sequence_group(monkeypatch):
    class Group:
        group_name = "fake"

    monkeypatch.setattr(distributed, "_SEQUENCE_GROUP", Group())


def test_sharded_rewrites_to_tree_or_ring(monkeypatch):
    _fake_sequence_group(monkeypatch)
    q, k, v, mask = inputs()
    for impl, op in [
        ("tree", torch.ops.zycompile.tree_attention.default),
        ("ring", torch.ops.zycompile.ring_attention.default),
    ]:
        gm = capture(lambda *a: attention(*a, 0.25, False), q, k, v, mask)
        res = TreeAttentionPass(TreeAttentionOptions(group="sequence", impl=impl), PassContext(RECIPE))(gm)
        assert res.matches == 1 and op in targets(gm)
        node = next(n for n in gm.graph.nodes if n.target is op)
        assert "fake" in node.args  # the group is baked in by name


def test_sharded_refuses_what_it_cannot_make_exact(monkeypatch):
    _fake_sequence_group(monkeypatch)
    q, k, v, mask = inputs()
    opts = TreeAttentionOptions(group="sequence")
    gm = capture(lambda *a: attention(*a, None, 0.25, True), q, k, v)  # causal by local index
    with pytest.raises(ZyError, match="bottom-right causal masking without a mask"):
        TreeAttentionPass(opts, PassContext(RECIPE))(gm)
    # an attention canonicalize_attention left alone (dropout) would see only this rank's keys
    gm = capture(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.5), q, k[:, :1], v[:, :1]
    )
    with pytest.raises(ZyError, match="could not rewrite"):
        TreeAttentionPass(opts, PassContext(RECIPE))(gm)


def test_sequence_group_required(monkeypatch):
    monkeypatch.setattr(distributed, "_SEQUENCE_GROUP", None)
    assert not dist.is_initialized()
    gm = capture(lambda *a: attention(*a, 0.25, False), *inputs())
    with pytest.raises(ZyError, match="no sequence-parallel group"):
        TreeAttentionPass(TreeAttentionOptions(group="sequence"), PassContext(RECIPE))(gm)
