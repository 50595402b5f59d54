"""Speculative decoding: greedy output identical to plain decoding with every drafter, rejection sampling
keeps the target distribution (and a broken rule is caught), rollback by masking, engine, adaptive k."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import zycompile
from zycompile.errors import RecipeError
from zycompile.models import load_model
from zycompile.runtime.draft_tree import DraftTree, tree_mask
from zycompile.runtime.eagle import EagleHead, save_head
from zycompile.runtime.engine import Engine
from zycompile.runtime.sampling import SamplingParams
from zycompile.runtime.speculative import accept_greedy, accept_rejection

# eager lowering (Dynamo graphs and the pre-grad passes, no AOT tracing): these test the runtime, and
# ran ~35% faster than aot_eager (the lowering paths have their own tests)
FAST = ["lowering.backend=eager", "runtime.prefill_buckets=[8, 32]", "runtime.max_seq_len=96"]
# Repetitive prompts give the ngram drafter matches; the others exercise the no-match path.
PROMPTS = [[5, 17, 33, 2, 9, 5, 17, 33, 2], [7, 8], list(range(40, 75)), [100, 101, 102, 100, 101]]
N_NEW = 16
DRAFTERS = {
    "ngram": ["speculative.method=ngram"],
    "early_exit": ["speculative.method=early_exit", "speculative.exit_layer=1"],
    "draft_model": [
        "speculative.method=draft_model",
        "speculative.draft_model=tiny:llama?num_hidden_layers=1",
    ],
    "draft_model_same": ["speculative.method=draft_model", "speculative.draft_model=tiny:llama"],
}


@pytest.fixture(autouse=True)
def _reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def reference():
    torch._dynamo.reset()
    opt = zycompile.optimize("tiny:llama", "llama-tiny", overrides=FAST)
    return opt.generate(PROMPTS, max_new_tokens=N_NEW, ignore_eos=True).tokens


@pytest.fixture(scope="module")
def tiny_head(tmp_path_factory):
    model = load_model("tiny:llama").model
    with torch.random.fork_rng():
        torch.manual_seed(0)
        head = EagleHead(model.config, type(model.model.layers[0]), torch.arange(0, 512, 2))
    path = tmp_path_factory.mktemp("heads") / "tiny-eagle.safetensors"
    save_head(head, path, {"target": "tiny:llama", "hidden_size": 64, "vocab_size": 512})
    return str(path)


def _spec(extra):
    return zycompile.optimize("tiny:llama", "llama-tiny", overrides=FAST + extra)


LOOKUP = ["speculative.lookup_tokens=3", "speculative.ngram_min=2"]  # 2-3 token matches: PROMPTS have them


def _eagle_lookup(head, *extra):
    """EAGLE with prompt lookup over 2-3 token matches (the repetitive prompts have them)."""
    return ["speculative.method=eagle", f"speculative.eagle_head={head}", *extra, *LOOKUP]


def _identical_alone_and_batched(opt, reference):
    """Generate PROMPTS batched and one at a time; both must be the plain greedy reference."""
    out = opt.generate(PROMPTS, max_new_tokens=N_NEW, ignore_eos=True)
    assert out.tokens == reference
    assert [opt.generate([p], max_new_tokens=N_NEW, ignore_eos=True).tokens[0] for p in PROMPTS] == reference
    return out


# ---- acceptance rules ------------------------------------------------------------------------


def test_accept_greedy_takes_longest_matching_prefix_then_target_token():
    v = 10
    target = torch.tensor([[3, 4, 5, 6], [3, 9, 5, 6], [1, 1, 1, 1]])  # argmax at positions 0..3
    logits = torch.nn.functional.one_hot(target, v).float()
    draft = torch.tensor([[3, 4, 5], [3, 4, 5], [2, 1, 1]])
    n, nxt = accept_greedy(draft, logits)
    assert n.tolist() == [3, 1, 0]
    assert nxt.tolist() == [6, 9, 1]  # bonus after all 3; correction after 1; correction at once


def _rejection_samples(broken: bool, rows=30000, vocab=6, k=3, seed=0):
    """First emitted token of one round, over many independent rounds with fixed p and q."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(k + 1, vocab, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(k, vocab, generator=g) * 1.5, -1)
    draft = torch.stack([torch.multinomial(q[j], rows, replacement=True, generator=g) for j in range(k)], 1)
    u = torch.rand(rows, k, generator=g)
    P, Q = p.expand(rows, -1, -1), q.expand(rows, -1, -1)
    if not broken:
        n, nxt = accept_rejection(draft, Q, P, u, [g] * rows)
    else:  # a classic bug: on rejection, resample from p instead of max(0, p - q)
        n = u * Q.gather(-1, draft[..., None])[..., 0] < P[:, :k].gather(-1, draft[..., None])[..., 0]
        n = n.long().cumprod(1).sum(1)
        nxt = torch.multinomial(P[torch.arange(rows), n], 1, generator=g)[:, 0]
    first = torch.where(n > 0, draft[:, 0], nxt)
    return first, p[0], n


def _chi_square(samples, probs) -> float:
    counts = torch.bincount(samples, minlength=len(probs)).double()
    expected = probs.double() * len(samples)
    return float(((counts - expected) ** 2 / expected).sum())


CHI2_DF5_P001 = 20.515  # chi-square critical value, 5 degrees of freedom, p = 0.001


def test_rejection_sampling_preserves_the_target_distribution():
    first, p0, n = _rejection_samples(broken=False)
    assert 0 < n.float().mean() < 3  # both outcomes occur: the test exercises acceptance and rejection
    assert _chi_square(first, p0) < CHI2_DF5_P001


def test_broken_acceptance_rule_fails_the_same_test():
    first, p0, _ = _rejection_samples(broken=True)
    assert _chi_square(first, p0) > 10 * CHI2_DF5_P001


def test_bonus_token_follows_the_last_position():
    # q == p: every draft is accepted, and the bonus comes from p[k] alone.
    g = torch.Generator().manual_seed(1)
    rows, vocab, k = 20000, 5, 2
    p = torch.softmax(torch.randn(k + 1, vocab, generator=g), -1)
    draft = torch.stack([torch.multinomial(p[j], rows, replacement=True, generator=g) for j in range(k)], 1)
    n, nxt = accept_rejection(
        draft,
        p[:k].expand(rows, -1, -1),
        p.expand(rows, -1, -1),
        torch.rand(rows, k, generator=g),
        [g] * rows,
    )
    assert bool((n == k).all())
    assert _chi_square(nxt, p[k]) < 18.47  # 4 degrees of freedom, p = 0.001


# ---- greedy identity with every drafter ------------------------------------------------------


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_greedy_output_identical_to_plain_decoding(name, reference):
    opt = _spec(DRAFTERS[name])
    s = _identical_alone_and_batched(opt, reference).speculative
    assert s["drafted"] > 0 and 0 <= s["acceptance_rate"] <= 1
    assert s["tokens_per_forward"] == pytest.approx(1 + s["mean_accepted"], abs=0.5)
    if name == "draft_model_same":  # the draft is the target: everything is accepted
        assert s["acceptance_rate"] == 1.0 and s["tokens_per_forward"] > 4


def test_eagle_greedy_identical(reference, tiny_head):
    opt = _spec(
        ["speculative.method=eagle", f"speculative.eagle_head={tiny_head}", "speculative.num_tokens=3"]
    )
    assert opt.generate(PROMPTS, max_new_tokens=N_NEW, ignore_eos=True).tokens == reference


def test_eagle_drafts_equal_a_cache_free_reference(tiny_head):
    """The head's incremental drafting (catch-up entries, its own KV cache, fed-back features) gives
    the drafts a plain causal forward over the whole entry sequence gives."""
    opt = _spec(
        ["speculative.method=eagle", f"speculative.eagle_head={tiny_head}", "speculative.num_tokens=3"]
    )
    gen = opt.generator()
    drafter = gen.speculator.drafter
    prompt = PROMPTS[2]
    y = int(gen.speculator.prefill([prompt], [len(prompt)]).argmax(-1))
    pos = torch.tensor([len(prompt)])
    draft, _ = drafter.propose([prompt + [y]], torch.tensor([y]), pos, [SamplingParams()], [None], 3)
    with torch.no_grad():
        seq = prompt + [y]
        feats = gen.decoder(input_ids=torch.tensor([seq]), use_cache=False).last_hidden_state[0]
        feats, toks, ref = list(feats[:-1]), seq[1:], []
        for _ in range(3):
            t = len(toks)
            emb = gen.decoder.embed_tokens(torch.tensor([toks]))
            p = torch.arange(t)[None]
            mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
            g = drafter.head(torch.stack(feats)[None], emb, mask, p, gen.decoder.rotary_emb(emb, p))[0, -1]
            ref.append(int(drafter.head.vocab_ids[(g @ drafter.w_draft.T).argmax()]))
            feats.append(g)
            toks.append(ref[-1])
    assert draft[0].tolist() == ref


def test_eagle_with_prompt_lookup_drafts_repeats_from_the_context_and_output_stays_identical(
    reference, tiny_head
):
    """The head drafts one token; where the context's last 2-3 tokens occurred before (the repetitive
    prompts), up to 3 lookup drafts replace it for that row. Batched rows mix the two."""
    opt = _spec(_eagle_lookup(tiny_head, "speculative.num_tokens=1"))
    out = _identical_alone_and_batched(opt, reference)
    drafter = opt.generator().speculator.drafter
    s = out.speculative
    assert drafter.lookup_rounds > 0 and s["drafted"] > s["rounds"]  # some rounds verified 2-3 drafts


# ---- draft trees -----------------------------------------------------------------------------


def test_draft_tree_merges_shared_prefixes_and_accepts_the_argmax_path():
    tree = DraftTree.from_paths([[[4], [5], [4, 6], [4, 7, 8]], [[9]]])
    assert tree.tokens == [[4, 5, 6, 7, 8], [9]]
    assert tree.parents == [[0, 0, 1, 1, 4], [0]]
    ids, depth, anc = tree.inputs([1, 2], width=6)
    assert ids.tolist() == [[1, 4, 5, 6, 7, 8], [2, 9, 2, 2, 2, 2]]  # row 1 padded with its pending token
    assert depth.tolist() == [[0, 1, 1, 2, 2, 3], [0, 1, 1, 1, 1, 1]]
    assert anc[0, 5].tolist() == [True, True, False, False, True, True]  # 8 <- 7 <- 4 <- pending
    # target argmax after each node: row 0 follows 4 -> 7 -> 8 then corrects; row 1's padding is never
    # accepted even where the target picks its token (2), and the next token is the correction
    target = [[4, 7, 0, 0, 8, 3], [2, 0, 0, 0, 0, 0]]
    paths, nxt = tree.accept_greedy(target)
    assert paths == [[1, 4, 5], []] and nxt == [3, 2]


def test_tree_mask_sees_the_context_and_each_nodes_ancestors():
    tree = DraftTree.from_paths([[[4], [5], [4, 6]]])
    _, _, anc = tree.inputs([1], width=4)
    keys = torch.arange(12)
    mask = tree_mask(keys, torch.tensor([5]), anc)[0, 0]  # block in slots 5..8
    assert mask[:, :5].all() and not mask[:, 9:].any()
    assert mask[:, 5:9].tolist() == anc[0].tolist()


def _oracle_tree(drafter, reference, prompts):
    """Trees that hide each row's true continuation behind wrong branches: [wrong], [t1, wrong],
    [t1, t2, t3]. Accepting it takes the second branch at depth 1 (block slots 2, 4, 5), so every
    round moves the accepted K/V; an error there changes the next tokens."""
    vocab = 512

    def propose_tree(ctx, pending, pos):
        paths = []
        for c in ctx:
            i = next((i for i, p in enumerate(prompts) if c[: len(p)] == p), 0)
            done = len(c) - len(prompts[i])
            t = (reference[i][done : done + 3] + [0, 0, 0])[:3]
            paths.append([[(t[0] + 1) % vocab], [t[0], (t[1] + 1) % vocab], t[:3]])
        return DraftTree.from_paths(paths)

    drafter.propose_tree = propose_tree


def test_tree_verify_with_branching_accepts_move_the_cache_right(reference, tiny_head):
    prompts = [PROMPTS[0], PROMPTS[2]]  # distinct prompts: the oracle finds a row by its prompt
    opt = _spec(
        [
            "speculative.method=eagle",
            f"speculative.eagle_head={tiny_head}",
            "speculative.tree=[2, 2, 1]",
            "speculative.tree_max_batch=2",
        ]
    )
    spec = opt.generator().speculator
    _oracle_tree(spec.drafter, [reference[0], reference[2]], prompts)
    out = opt.generate(prompts, max_new_tokens=N_NEW, ignore_eos=True)
    assert out.tokens == [reference[0], reference[2]]
    s = out.speculative
    assert s["tree_rounds"] == s["forwards"] and s["tokens_per_forward"] > 3.5  # 3 accepted + bonus a round


def test_eagle_tree_greedy_identical_alone_and_batched(reference, tiny_head):
    opt = _spec(_eagle_lookup(tiny_head, "speculative.tree=[3, 2]", "speculative.tree_max_batch=4"))
    s = _identical_alone_and_batched(opt, reference).speculative
    assert s["tree_rounds"] == s["forwards"] > 0 and s["drafted"] > 3 * s["rounds"]  # 5 nodes, or lookup
    # sampled rows verify a chain by default, the tree with tree_sampling (reproducibly under a seed)
    kw = dict(max_new_tokens=6, temperature=0.8, seed=0, ignore_eos=True)
    before = opt.generator().speculator.stats.tree_rounds
    opt.generate(PROMPTS[:1], **kw)
    assert opt.generator().speculator.stats.tree_rounds == before
    opt = _spec(
        _eagle_lookup(
            tiny_head,
            "speculative.tree=[3, 2]",
            "speculative.tree_max_batch=4",
            "speculative.tree_sampling=true",
        )
    )
    a = opt.generate(PROMPTS[:2], **kw).tokens
    assert opt.generator().speculator.stats.tree_rounds > 0
    assert a == opt.generate(PROMPTS[:2], **kw).tokens and all(len(t) == 6 for t in a)


def test_tree_levels_past_the_first_only_where_the_best_draft_is_likely(reference, tiny_head):
    """tree [2, 1] with draft_confidence: the second level (a second head call, one more verify
    position) is drafted only while the best first draft's probability clears the threshold; a
    tree cut short verifies its own, narrower width. Outputs stay plain greedy either way."""
    drafted = {}
    for threshold in ("0.0", "0.99"):  # the tiny random head is never 99% sure
        opt = _spec(
            [
                "speculative.method=eagle",
                f"speculative.eagle_head={tiny_head}",
                "speculative.tree=[2, 1]",
                f"speculative.draft_confidence={threshold}",
            ]
        )
        out = opt.generate(PROMPTS[:1], max_new_tokens=N_NEW, ignore_eos=True)
        assert out.tokens == reference[:1]
        s = out.speculative
        assert s["tree_rounds"] == s["forwards"] > 0
        drafted[threshold] = s["drafted"] / s["rounds"]
        assert opt.generator().speculator.tree_widths == [1, 3, 4]
    assert drafted == {"0.0": 3, "0.99": 2}


def _tree_samples(broken: bool, rows: int = 20000, vocab: int = 6, seed: int = 0):
    """First and second emitted tokens of a sampled tree round, over many rounds with fixed target
    distributions: the root's candidates 2 and 4, and candidate 1 under 2."""
    g = torch.Generator().manual_seed(seed)
    tree = DraftTree.from_paths([[[2, 1], [4]]])  # nodes: 1 = 2, 2 = 1 (under node 1), 3 = 4
    probs = torch.softmax(torch.randn(4, vocab, generator=g) * 1.5, -1)  # after the root and nodes 1-3
    first, second = [], []
    for _ in range(rows):
        if not broken:
            path, nxt = tree.accept_sampled(0, probs, g)
        else:  # a plausible bug: each candidate tried against p itself, not against what is left
            path, node = [], 0
            kids = {0: [(1, 2), (3, 4)], 1: [(2, 1)]}
            while True:
                hit = next(
                    (c for c, t in kids.get(node, []) if torch.rand((), generator=g) < probs[node, t]), None
                )
                if hit is None:
                    break
                path.append(hit)
                node = hit
            nxt = int(torch.multinomial(probs[node], 1, generator=g)[0])
        emitted = [tree.tokens[0][n - 1] for n in path] + [nxt]
        first.append(emitted[0])
        if path and path[0] == 1:  # the candidate 2 accepted: what follows it
            second.append(emitted[1])
    return torch.tensor(first), torch.tensor(second), probs


def test_tree_rejection_sampling_preserves_the_target_distribution():
    first, second, probs = _tree_samples(broken=False)
    assert _chi_square(first, probs[0]) < CHI2_DF5_P001
    assert _chi_square(second, probs[1]) < CHI2_DF5_P001  # after an accepted 2: node 1's distribution


def test_broken_tree_acceptance_fails_the_same_test():
    first, _, probs = _tree_samples(broken=True)
    assert _chi_square(first, probs[0]) > 10 * CHI2_DF5_P001


def test_eagle_draft_confidence_stops_drafting_early_and_output_stays_identical(reference, tiny_head):
    """An untrained head spreads its probability over 256 draft tokens: with a threshold every round
    verifies only its first draft (k' = 1 of k = 3), and greedy output is unchanged."""
    eagle = ["speculative.method=eagle", f"speculative.eagle_head={tiny_head}", "speculative.num_tokens=3"]
    opt = _spec(eagle + ["speculative.draft_confidence=0.5"])
    out = opt.generate(PROMPTS, max_new_tokens=N_NEW, ignore_eos=True)
    assert out.tokens == reference
    s = out.speculative
    assert s["drafted"] == s["rounds"] > 0  # one draft per round: stopped after the first
    opt = _spec(eagle)  # no threshold: all 3 drafts every round
    s = opt.generate(PROMPTS, max_new_tokens=N_NEW, ignore_eos=True).speculative
    assert s["drafted"] == 3 * s["rounds"]


@pytest.mark.parametrize("name", ["ngram", "eagle"])
def test_cost_aware_draft_length_keeps_greedy_output(name, reference, tiny_head):
    extra = ["speculative.cost_aware=true", "speculative.num_tokens=3"]
    extra += (
        DRAFTERS["ngram"]
        if name == "ngram"
        else ["speculative.method=eagle", f"speculative.eagle_head={tiny_head}"]
    )
    opt = _spec(extra)
    out = opt.generate(PROMPTS, max_new_tokens=N_NEW, ignore_eos=True)
    assert out.tokens == reference
    length = opt.generator().speculator.length
    assert any(ms is not None for ms in length.ms[1:])  # verify widths were timed
    if name == "eagle":  # the head's confidence is known per draft
        assert opt.generator().speculator.drafter.confidence.shape[0] == 4


def test_ngram_lookup_finds_the_latest_earlier_match_of_whole_tokens():
    """The byte search (4 bytes a token) gives the plain scan's answer: the latest earlier occurrence
    of the longest tail, never a match across two tokens' bytes (ids past 255 share byte patterns)."""
    import random

    from zycompile.runtime.drafters import NgramDrafter

    ng = NgramDrafter(3, 1)
    assert ng.lookup([7, 8, 9, 1, 7, 8, 9, 2, 7, 8, 9], 2) == [2, 7]  # the latest of two matches
    assert ng.lookup([256, 1, 5, 256], 2) == [1, 5]  # bytes 00 01 00 00 | 01 00 00 00 ... misaligned
    assert ng.lookup([1, 2, 3], 2) == []
    rng = random.Random(0)
    for _ in range(2000):
        seq = [rng.randrange(rng.choice([2, 5, 300, 70000])) for _ in range(rng.randrange(1, 40))]
        assert ng.lookup(seq, 3) == ng._lookup_slow(seq, 3), seq


def test_ngram_verifies_only_as_wide_as_its_longest_match():
    from zycompile.runtime.drafters import NgramDrafter

    ng, greedy = NgramDrafter(3, 1), [SamplingParams()] * 2
    ctx = [[1, 2, 3, 9, 1, 2, 3], [5, 6, 7, 8]]  # row 0: "1 2 3" -> "9 1 2 3"; row 1: no match
    pending = torch.tensor([3, 8])
    draft, q = ng.propose(ctx, pending, torch.tensor([6, 3]), greedy, [None, None], 8)
    assert q is None and draft.tolist() == [[9, 1, 2, 3], [8, 8, 8, 8]]
    assert ng.propose([[5, 6, 7, 8]], pending[1:], torch.tensor([3]), greedy[:1], [None], 4) == (None, None)


def test_adaptive_k_moves_and_output_stays_identical(reference):
    opt = _spec(DRAFTERS["draft_model_same"] + ["speculative.adaptive=true", "speculative.num_tokens=5"])
    spec = opt.generator().speculator
    spec.k = 1
    assert opt.generate(PROMPTS, max_new_tokens=N_NEW, ignore_eos=True).tokens == reference
    assert spec.k > 1  # every round was fully accepted: k grew
    opt = _spec(DRAFTERS["draft_model"] + ["speculative.adaptive=true", "speculative.num_tokens=3"])
    assert opt.generate(PROMPTS, max_new_tokens=N_NEW, ignore_eos=True).tokens == reference
    assert opt.generator().speculator.k == 1  # the random draft is always rejected: k shrank to min


def test_rejected_positions_are_invisible_without_rollback():
    """A verify writes garbage drafts into slots past the accepted position; the next step (at that
    position) gives exactly the logits it gives on a cache that never saw them."""
    prompt = PROMPTS[2]
    plain = zycompile.optimize("tiny:llama", "llama-tiny", overrides=FAST).generator()
    spec = _spec(["speculative.method=ngram"]).generator()
    for g in (plain, spec):
        g.prefill([prompt], [len(prompt)])
    garbage = torch.tensor([[7, 300, 301, 302, 303]])  # pending token 7, then 4 wrong drafts
    pos = torch.arange(len(prompt), len(prompt) + 5)[None]
    spec.speculator.forward(garbage, pos)
    assert spec.cache.keys[0][0, :, len(prompt) + 4].abs().sum() > 0  # stale entries really are there
    zero = torch.zeros(1, dtype=torch.long)
    step = torch.tensor([[7]]), torch.tensor([[len(prompt)]])
    torch.testing.assert_close(spec.step(*step, zero), plain.step(*step, zero), rtol=0, atol=1e-5)


def test_verify_graph_compiles_once_per_k():
    opt = _spec(DRAFTERS["early_exit"])
    for p in PROMPTS[:2]:  # both prefill buckets, the verify graph and the draft step
        opt.generate([p], max_new_tokens=8, ignore_eos=True)
    graphs = counters["stats"]["unique_graphs"]
    for p in PROMPTS[2:] + PROMPTS[:2]:
        opt.generate([p], max_new_tokens=12, ignore_eos=True)
    assert counters["stats"]["unique_graphs"] == graphs


def test_sampling_with_seed_is_reproducible():
    opt = _spec(DRAFTERS["draft_model"])
    kw = dict(max_new_tokens=12, ignore_eos=True, temperature=0.8, top_k=50, seed=3)
    a = opt.generate(PROMPTS[:2], **kw).tokens
    assert a == opt.generate(PROMPTS[:2], **kw).tokens
    assert all(len(t) == 12 for t in a)


# ---- engine ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ngram", "draft_model", "eagle", "eagle_lookup", "eagle_tree"])
def test_engine_requests_get_their_plain_greedy_tokens(name, reference, tiny_head):
    extra = (
        ["speculative.method=eagle", f"speculative.eagle_head={tiny_head}"]
        if name.startswith("eagle")
        else DRAFTERS[name]
    )
    if name == "eagle_lookup":
        extra += ["speculative.num_tokens=1", *LOOKUP]
    if name == "eagle_tree":
        extra += [
            "speculative.tree=[2, 1]",
            "speculative.tree_max_batch=4",  # the engine's batches of 2-4 verify trees too
            *LOOKUP,
        ]
    gen = _spec(extra).generator()
    eng = Engine(gen, max_concurrency=3)
    params = SamplingParams(max_new_tokens=N_NEW, ignore_eos=True)
    reqs = [eng.add_request(p, params) for p in PROMPTS[:2]]
    for _ in range(3):  # two decoding when the others join
        eng.step()
    reqs += [eng.add_request(p, params) for p in PROMPTS[2:]]
    eng.run()
    assert [r.output for r in reqs] == reference
    assert gen.speculator.stats.rounds > 0
    if name == "eagle_tree":
        assert gen.speculator.stats.tree_rounds > 0


# ---- errors ----------------------------------------------------------------------------------


def test_bad_drafter_configs_are_one_clear_error(tmp_path):
    with pytest.raises(RecipeError, match="exit_layer: got 2; the target has 2 layers"):
        _spec(["speculative.method=early_exit", "speculative.exit_layer=2"]).generator()
    with pytest.raises(RecipeError, match="1024 tokens, the target 512"):
        _spec(
            ["speculative.method=draft_model", "speculative.draft_model=tiny:llama?vocab_size=1024"]
        ).generator()
    with pytest.raises(RecipeError, match=r"draft_confidence: got 1.5; expected a number in \[0, 1\)"):
        _spec(["speculative.method=ngram", "speculative.draft_confidence=1.5"])
    with pytest.raises(RecipeError, match="eagle_head: file 'nope.safetensors' not found"):
        _spec(["speculative.method=eagle", "speculative.eagle_head=nope.safetensors"]).generator()
    model = load_model("tiny:llama?hidden_size=32&head_dim=8").model
    head = EagleHead(model.config, type(model.model.layers[0]), torch.arange(10))
    save_head(head, tmp_path / "h.safetensors", {"target": "x", "hidden_size": 32, "vocab_size": 512})
    with pytest.raises(RecipeError, match="trained for hidden_size 32"):
        _spec(
            ["speculative.method=eagle", f"speculative.eagle_head={tmp_path / 'h.safetensors'}"]
        ).generator()
