"""Draft trees: several candidate continuations verified in one target forward (EAGLE/SpecInfer style).

A row's tree is a trie of draft paths under the pending token (node 0). Its nodes go into the verify
block in order (a parent before its children), so a node at depth d sits at block index >= d:

    node:   0 (pending)   1: "the"   2: "a"   3: "the" -> "cat"   ...
    RoPE:   p             p + 1      p + 1    p + 2
    slot:   p             p + 1      p + 2    p + 3              (the block's cache slots, in order)

Each node attends to the committed cache (slots < p) and to its ancestors and itself in the block
(``ancestors``), so its logits are those of the path to it, exactly as if that path had been decoded.
Greedy acceptance walks from the root, following the child that equals the target's argmax. The
accepted path's K/V then move from their block slots to p + 1, p + 2, ... (``StaticKVCache.move_slots``)
where the next round expects them; slots past the path are rolled back by masking, as for a chain.
"""

from __future__ import annotations

import dataclasses

import torch

from zycompile.ops.library import define


@dataclasses.dataclass
class DraftTree:
    """Per row: ``tokens[i]`` and ``parents[i]`` of nodes 1..n (parent 0 is the pending token)."""

    tokens: list[list[int]]
    parents: list[list[int]]

    @classmethod
    def from_paths(cls, paths: list[list[list[int]]]) -> DraftTree:
        """Merge each row's candidate paths into a trie (shared prefixes become one node)."""
        tokens, parents = [], []
        for row in paths:
            toks, pars, index = [], [], {}
            for path in row:
                parent = 0
                for t in path:
                    node = index.get((parent, t))
                    if node is None:
                        toks.append(t)
                        pars.append(parent)
                        node = index[(parent, t)] = len(toks)
                    parent = node
            tokens.append(toks)
            parents.append(pars)
        return cls(tokens, parents)

    @property
    def nodes(self) -> list[int]:
        return [len(t) for t in self.tokens]

    def inputs(self, pending: list[int], width: int):
        """Verify inputs for a block of ``width`` (>= 1 + the most nodes): ids and depths [B, width] and
        the ancestor-or-self mask [B, width, width]. Padding nodes hang off the root (never accepted:
        they repeat the pending token under it, and a tree's acceptance only follows real children)."""
        if width < 1 + max(self.nodes, default=0):
            raise ValueError(f"a verify block of {width} cannot hold a tree of {max(self.nodes)} nodes")
        ids, depth, anc = [], [], []  # Python lists, one tensor each at the end: ~µs, not ~ms
        for b, (toks, pars) in enumerate(zip(self.tokens, self.parents)):
            ids.append([pending[b], *toks] + [pending[b]] * (width - 1 - len(toks)))
            par = [-1, *pars] + [0] * (width - 1 - len(toks))
            d, a = [0] * width, [[False] * width for _ in range(width)]
            for i in range(width):
                if i:
                    a[i] = list(a[par[i]])
                    d[i] = d[par[i]] + 1
                a[i][i] = True
            depth.append(d)
            anc.append(a)
        return torch.tensor(ids), torch.tensor(depth), torch.tensor(anc)

    def accept_greedy(self, target: list[list[int]]) -> tuple[list[list[int]], list[int]]:
        """``target[b][i]``: the target's argmax after node i. Per row, the accepted path (node indices,
        root excluded) and the next token (the correction, or the bonus after the path's last node)."""
        paths, nxt = [], []
        for b, (toks, pars) in enumerate(zip(self.tokens, self.parents)):
            children: dict[tuple[int, int], int] = {(p, t): i + 1 for i, (t, p) in enumerate(zip(toks, pars))}
            node, path = 0, []
            while (child := children.get((node, target[b][node]))) is not None:
                path.append(child)
                node = child
            paths.append(path)
            nxt.append(target[b][node])
        return paths, nxt

    def accept_sampled(
        self, b: int, probs: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[list[int], int]:
        """Row ``b`` of a sampled round: ``probs`` [width, V] is the target's sampling distribution after
        each block node. Multi-candidate speculative sampling with deterministic drafts (SpecInfer): at
        a node its children are tried in order, child t accepted with probability r(t) / sum(r), r being
        the node's distribution with the children tried before removed; when none is, the next token
        is drawn from r (or, after the path's last node, from its distribution: the bonus). Each token
        is then an exact draw from the target's distribution, as sampling from p by sequential
        rejection is. Returns the accepted path (node indices, root excluded) and the next token."""
        children: dict[int, list[tuple[int, int]]] = {}
        for i, (t, par) in enumerate(zip(self.tokens[b], self.parents[b])):
            children.setdefault(par, []).append((i + 1, t))
        node, path = 0, []
        while True:
            # a CPU copy (the row's generator is a CPU one); tried candidates are zeroed in it
            r = probs[node].to("cpu", torch.float64, copy=True)
            accepted = None
            for child, t in children.get(node, []):
                mass = float(r.sum())
                if mass <= 0:
                    break
                if float(torch.rand((), generator=generator, dtype=torch.float64)) * mass < float(r[t]):
                    accepted = child
                    break
                r[t] = 0.0
            if accepted is None:  # none accepted (or none to try): the next token from what is left
                if float(r.sum()) <= 0:  # rounding left nothing: the node's own distribution
                    r = probs[node].to("cpu", torch.float64)
                return path, int(torch.multinomial(r, 1, generator=generator)[0])
            path.append(accepted)
            node = accepted


def _tree_mask(keys: torch.Tensor, start: torch.Tensor, anc: torch.Tensor) -> torch.Tensor:
    off = keys[None, :] - start[:, None]  # [B, S]: a key's offset into row b's block
    width = anc.shape[-1]
    inside = (off >= 0) & (off < width)
    idx = off.clamp(0, width - 1)[:, None, :].expand(-1, anc.shape[1], -1)
    return ((off < 0)[:, None, :] | (inside[:, None, :] & anc.gather(2, idx)))[:, None]


def _tree_mask_fake(keys, start, anc):
    return anc.new_empty((anc.shape[0], 1, anc.shape[1], keys.shape[0]), dtype=torch.bool)


# tree_mask(keys, start, anc): boolean [B, 1, W, S]. The query at block node i of row b sees the slots
# holding positions before its block (start[b]) and the block slots of its ancestors and itself
# (anc [B, W, W]). An op for the reason position_mask is one: one buffer every layer reads.
tree_mask = define(
    "tree_mask", "(Tensor keys, Tensor start, Tensor anc) -> Tensor", _tree_mask, _tree_mask_fake
)
