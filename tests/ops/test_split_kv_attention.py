"""Split-KV attention on one device: partials + max/sum merge equal dense attention; the Triton kernel too."""

from __future__ import annotations

import textwrap

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zycompile.ops.attention import attention, reference_attention
from zycompile.ops.tree_attention import merge_partials, partial_attention, split_kv_attention, tree_merge


def _inputs(seed, b, hkv, rep, tq, tk, d, dv):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * rep, tq, d, generator=g)
    k = torch.randn(b, hkv, tk, d, generator=g)
    v = torch.randn(b, hkv, tk, dv, generator=g)
    return q, k, v


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 2),
    hkv=st.integers(1, 3),
    rep=st.integers(1, 3),
    tk=st.integers(1, 40),
    tq=st.integers(1, 5),
    dv=st.sampled_from([8, 16]),
    splits=st.integers(1, 7),
    causal=st.booleans(),
    masked=st.booleans(),
)
def test_split_kv_equals_dense(seed, b, hkv, rep, tk, tq, dv, splits, causal, masked, case_counter):
    tq = min(tq, tk)
    q, k, v = _inputs(seed, b, hkv, rep, tq, tk, 16, dv)
    mask = None
    if masked:
        mask = torch.rand(b, 1, tq, tk, generator=torch.Generator().manual_seed(seed)) > 0.4
        own = torch.arange(tq) + tk - tq  # each query sees at least its own position (as in a cache)
        mask[:, :, torch.arange(tq), own] = True
    out, lse = split_kv_attention(q, k, v, mask, 0.3, causal, splits)
    torch.testing.assert_close(out, reference_attention(q, k, v, mask, 0.3, causal), rtol=1e-5, atol=1e-5)
    _, dense_lse = partial_attention(q, k, v, mask, 0.3, causal)
    torch.testing.assert_close(lse, dense_lse, rtol=1e-5, atol=1e-5)
    key = "split-KV vs dense attention, one device"
    case_counter[key] = case_counter.get(key, 0) + 1


def test_additive_mask_and_bf16():
    q, k, v = _inputs(0, 1, 2, 2, 3, 50, 16, 16)
    add = torch.zeros(1, 1, 3, 50)
    add[..., :7] = float("-inf")
    out, _ = split_kv_attention(q, k, v, add, 0.25, False, 4)
    torch.testing.assert_close(out, reference_attention(q, k, v, add, 0.25), rtol=1e-5, atol=1e-5)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    out_b, lse_b = split_kv_attention(qb, kb, vb, None, 0.25, False, 4)
    assert out_b.dtype == torch.bfloat16 and lse_b.dtype == torch.float32
    torch.testing.assert_close(
        out_b.float(), attention(qb, kb, vb, None, 0.25, False).float(), rtol=2e-2, atol=2e-2
    )


def test_pairwise_tree_merge_equals_stacked_merge():
    q, k, v = _inputs(1, 2, 1, 3, 2, 33, 8, 8)
    parts = [partial_attention(q, ki, vi, None, 0.5, False) for ki, vi in zip(k.split(5, 2), v.split(5, 2))]
    o_tree, l_tree = tree_merge(parts)
    o_flat, l_flat = merge_partials(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    torch.testing.assert_close(o_tree, o_flat)
    torch.testing.assert_close(l_tree, l_flat)
    torch.testing.assert_close(o_tree, reference_attention(q, k, v, None, 0.5), rtol=1e-5, atol=1e-5)


def test_fully_masked_split_contributes_nothing():
    q, k, v = _inputs(2, 1, 1, 1, 1, 12, 8, 8)
    mask = torch.zeros(1, 1, 1, 12, dtype=torch.bool)
    mask[..., :3] = True  # splits 2..4 see nothing: their lse is -inf and must not produce NaN
    out, lse = split_kv_attention(q, k, v, mask, 1.0, False, 4)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out, reference_attention(q, k, v, mask, 1.0), rtol=1e-5, atol=1e-5)


def test_op_compiles_with_fake_impl():
    q, k, v = _inputs(3, 1, 2, 2, 1, 20, 16, 8)
    fn = torch.compile(
        lambda *a: split_kv_attention(*a, None, 0.25, False, 3)[0], backend="aot_eager", fullgraph=True
    )
    torch.testing.assert_close(fn(q, k, v), reference_attention(q, k, v, None, 0.25), rtol=1e-5, atol=1e-5)


TRITON_CHECK = textwrap.dedent(
    """
    import torch
    from zycompile.ops import triton_split_kv as T
    from zycompile.ops.attention import reference_attention
    from zycompile.ops.tree_attention import partial_attention
    cases = [  # b, hq, hkv, tq, tk, d, dv, splits, masked
        (2, 4, 2, 1, 100, 16, 16, 4, True), (1, 6, 1, 3, 37, 24, 8, 5, True), (1, 2, 2, 1, 5, 8, 8, 8, False),
        (3, 9, 3, 1, 130, 64, 64, 3, True), (1, 4, 4, 2, 64, 32, 16, 1, False),
    ]
    for i, (b, hq, hkv, tq, tk, d, dv, splits, masked) in enumerate(cases):
        g = torch.Generator().manual_seed(i)
        q, k, v = torch.randn(b, hq, tq, d, generator=g), torch.randn(b, hkv, tk, d, generator=g), torch.randn(b, hkv, tk, dv, generator=g)
        mask = None
        if masked:
            mask = torch.rand(b, 1, tq, tk, generator=g) > 0.3
            mask[..., 0] = True
        assert T.supports(q, k, v, mask, False)
        out, lse = T.split_kv_attention(q, k, v, mask, d ** -0.5, splits)
        torch.testing.assert_close(out, reference_attention(q, k, v, mask, d ** -0.5), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, partial_attention(q, k, v, mask, d ** -0.5, False)[1], rtol=1e-5, atol=1e-5)
    print("triton split-KV ok", len(cases))
    """
)


def test_triton_kernel_under_interpreter(run_interpreted):
    assert "triton split-KV ok 5" in run_interpreted(TRITON_CHECK)


def test_cpu_causal_bool_mask_takes_the_causal_kernel_with_the_same_result():
    from unittest import mock

    from zycompile.ops import attention as attn_mod

    g = torch.Generator().manual_seed(3)
    t = 20  # a prefill chunk: longer than the C++ decode kernel's query blocks
    q, k, v = (torch.randn(2, h, t, 8, generator=g) for h in (4, 2, 2))
    tril = torch.ones(t, t, dtype=torch.bool).tril()
    not_causal = tril.clone()
    not_causal[5, 1] = False
    for mask, fast in ((tril[None, None], True), (tril.expand(2, 1, t, t), True), (not_causal, False)):
        with mock.patch.object(
            attn_mod.F, "scaled_dot_product_attention", wraps=attn_mod.F.scaled_dot_product_attention
        ) as sdpa:
            out = attention(q, k, v, mask, 0.3, False)
        assert sdpa.call_args.kwargs["is_causal"] is fast
        assert (sdpa.call_args.kwargs["attn_mask"] is None) is fast
        torch.testing.assert_close(out, reference_attention(q, k, v, mask, 0.3), rtol=1e-5, atol=1e-5)


def test_cpu_decode_batch_reads_each_rows_keys_only_when_lengths_differ(monkeypatch):
    """A decode batch with one long request among short ones: one SDPA call per row, each over its own
    visible keys; rows of about one length: one call over the longest row's keys. Same result."""
    from unittest import mock

    from zycompile.ops import attention as attn_mod

    g = torch.Generator().manual_seed(5)
    b, s = 4, 64
    q = torch.randn(b, 4, 1, 8, generator=g)
    k, v = (torch.randn(b, 2, s, 8, generator=g) for _ in range(2))
    monkeypatch.setattr(attn_mod, "ROW_CALL_BYTES", 512)  # this test's keys are 64 B each
    monkeypatch.setattr(attn_mod.cpu_decode_attention, "ENABLED", False)  # the SDPA fallback's trimming
    for lens, per_row in (([60, 5, 9, 3], True), ([20, 19, 20, 18], False)):
        mask = (torch.arange(s)[None, :] < torch.tensor(lens)[:, None])[:, None, None, :]
        with mock.patch.object(
            attn_mod.F, "scaled_dot_product_attention", wraps=attn_mod.F.scaled_dot_product_attention
        ) as sdpa:
            out = attention(q, k, v, mask, 0.3, False)
        read = [c.args[1].shape[-2] for c in sdpa.call_args_list]
        assert read == (lens if per_row else [max(lens)])
        torch.testing.assert_close(out, reference_attention(q, k, v, mask, 0.3), rtol=1e-5, atol=1e-5)


def test_cpu_decode_mask_is_dropped_only_where_every_query_sees_every_kept_key(monkeypatch):
    """Without the C++ kernel, a decode step's mask is a prefix per row: once the empty cache tail is
    cut off nothing is left to mask, so SDPA gets none. A left-padded row, a verify block's triangle,
    an all-masked row or uneven rows in one call keep it. Same result either way."""
    from unittest import mock

    from zycompile.ops import attention as attn_mod

    monkeypatch.setattr(attn_mod.cpu_decode_attention, "ENABLED", False)

    g = torch.Generator().manual_seed(7)
    s = 32
    keys = torch.arange(s)

    def prefix(lens, tq=1):  # query i of a row of length n sees keys < n - tq + 1 + i
        pos = torch.tensor(lens)[:, None] - tq + torch.arange(tq)
        return (keys[None, None, :] <= pos[:, :, None])[:, None]

    padded = prefix([9, 9])
    padded[1, ..., :3] = False  # row 1 left-padded by 3
    empty = prefix([9, 9])
    empty[1] = False
    cases = [
        (prefix([9]), [None]),
        (prefix([9, 9, 9]), [None]),
        (prefix([9, 7, 9]), ["mask"]),  # one call over 9 keys: row 1 must not see keys 7, 8
        (padded, ["mask"]),
        (prefix([12], tq=4), ["mask"]),  # a verify block: causal within it
        (empty, ["mask"]),
    ]
    for mask, want in cases:
        b, tq = mask.shape[0], mask.shape[2]
        q = torch.randn(b, 4, tq, 8, generator=g)
        k, v = (torch.randn(b, 2, s, 8, generator=g) for _ in range(2))
        with mock.patch.object(
            attn_mod.F, "scaled_dot_product_attention", wraps=attn_mod.F.scaled_dot_product_attention
        ) as sdpa:
            out = attention(q, k, v, mask, 0.3, False)
        got = [None if c.kwargs["attn_mask"] is None else "mask" for c in sdpa.call_args_list]
        assert got == want, mask.shape
        seen = mask.reshape(b, -1).any(1)  # a row that sees no key has no defined output
        ref = reference_attention(q, k, v, mask, 0.3)
        torch.testing.assert_close(out[seen], ref[seen], rtol=1e-5, atol=1e-5)
