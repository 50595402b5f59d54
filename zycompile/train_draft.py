"""``zycompile train-draft``: train an EAGLE draft head (runtime/eagle.py) for the recipe's model.

Data: ShareGPT conversations rendered with the model's chat template and packed into ``--seq-len``
token rows. The conversations the benchmarks sample their prompts from (the first ``HELD_OUT`` of
``sample_sharegpt``'s seed-0 order) are left out, so a benchmark never measures on training text.

The frozen target's forward is most of the cost (the head is one layer), so it runs once: the hidden
states f (the LM head's input) of every training row are computed first and kept in memory in the
target's compute dtype (``--features`` also saves them to a file a later run reuses), then the head
trains ``--steps`` over them (``--rows`` of them: several epochs when steps x batch is larger). The head learns entry p = (f_p, x_{p+1}) -> f_{p+1}: smooth-L1
to f_{p+1} plus ``--ce-weight`` x cross-entropy to the target's next-token distribution over the
draft vocabulary (recomputed from f_{p+1}; EAGLE's loss), with uniform noise on the input features
so it tolerates its own predicted features when drafting. The draft vocabulary is the
``--draft-vocab`` tokens the target predicts most often on the training text.

``--unroll N`` adds EAGLE-3's training-time test: the head runs N times over each row, the s-th time
fed its own (s-1)-th outputs as features, exactly as drafting feeds them for the s-th draft (the same
positions, tokens and attention: each entry sees the target's real entries before it and its own
chain's earlier entries; ``unrolled``). Without it the head only ever learns from the target's
features and its second draft is right far less often than its first. ``--init HEAD`` starts from a
trained head (its draft vocabulary too), so the unrolled training can refine one.
"""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import torch

HELD_OUT = 1000


def add_parser(sub, add_recipe_args) -> None:
    p = sub.add_parser("train-draft", help="train an EAGLE draft head for speculative decoding")
    add_recipe_args(p)
    p.add_argument("--out", required=True, help="where to write the head (.safetensors)")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps (default 120)")
    p.add_argument("--batch", type=int, default=8, help="rows per step (default 8)")
    p.add_argument(
        "--rows",
        type=int,
        default=None,
        help="distinct training rows, whose target features are computed once (default steps x batch: "
        "one epoch); the steps cycle over them in a new order each epoch",
    )
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row (default 256)")
    p.add_argument("--draft-vocab", type=int, default=8192, help="draft vocabulary size (default 8192)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--ce-weight", type=float, default=0.1, help="weight of the cross-entropy term (default 0.1)"
    )
    p.add_argument(
        "--val-rows", type=int, default=16, help="held-out rows for the reported top-1 (default 16)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float32"],
        default="auto",
        help="compute dtype of the frozen target and autocast (default auto: bfloat16 where the CPU "
        "has bf16 instructions, where its GEMMs ran ~2.4x fp32; float32 elsewhere, where they ran 2.5-3x "
        "slower than fp32)",
    )
    p.add_argument(
        "--features",
        default=None,
        help="file to save the target features to, or load them from when it matches this run's rows",
    )
    p.add_argument("--max-minutes", type=float, default=None, help="stop training after this long (saves)")
    p.add_argument(
        "--unroll",
        type=int,
        default=1,
        help="drafts per row the head trains on, each fed its own previous output (EAGLE-3's "
        "training-time test; default 1: only the target's features)",
    )
    p.add_argument(
        "--init", default=None, help="start from this trained head (.safetensors) and its vocabulary"
    )
    p.add_argument(
        "--replies",
        default=None,
        metavar="FILE",
        help="train on the target's own replies in this JSONL file (zycompile/draft_data.py) instead of "
        "ShareGPT text: what the head drafts for",
    )
    p.add_argument(
        "--generate-replies",
        type=int,
        default=0,
        metavar="N",
        help="first write --replies FILE: the target's greedy replies to N training prompts (when FILE "
        "is missing; an existing one is reused)",
    )
    p.add_argument(
        "--reply-len", type=int, default=256, help="tokens per generated reply at most (default 256)"
    )
    p.add_argument(
        "--reply-batch", type=int, default=32, help="replies generated at once (a decode batch; default 32)"
    )
    p.set_defaults(func=cmd_train_draft)


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 GEMM instructions (AVX512-BF16 or AMX); without them torch's bf16
    GEMMs are emulated and slower than fp32."""
    cpu = torch.cpu
    return any(
        getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def training_conversations(convs: list[dict], seed: int) -> list[dict]:
    """The conversations a head may train on, in a ``seed`` order: those with two turns or more,
    less the first ``HELD_OUT`` of ``sample_sharegpt``'s order (the benchmarks' prompts)."""
    convs = [c for c in convs if len(c["conversations"]) >= 2]
    random.Random(0).shuffle(convs)  # sample_sharegpt's order: its first conversations are held out
    train = convs[HELD_OUT:]
    random.Random(seed).shuffle(train)
    return train


def token_rows(tokenizer, seq_len: int, count: int, seed: int) -> torch.Tensor:
    """``count`` rows of ``seq_len`` tokens: packed chat-rendered conversations, benchmarks' held out."""
    from zycompile.data import load_conversations

    stream: list[int] = []
    need = seq_len * count
    for c in training_conversations(load_conversations(), seed):
        msgs = [
            {"role": "user" if t.get("from") == "human" else "assistant", "content": t.get("value") or ""}
            for t in c["conversations"][:4]
            if t.get("from") in ("human", "gpt")
        ]
        if len(msgs) < 2:
            continue
        ids = tokenizer.apply_chat_template(msgs, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        stream.extend(ids[: 2 * seq_len])  # cap one long conversation's share
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(f"only {len(stream)} training tokens available, {need} requested")
    return torch.tensor(stream[:need]).view(count, seq_len)


def target_features(decoder, rows: torch.Tensor, batch: int, log) -> torch.Tensor:
    """The frozen target's last hidden states for every row, [R, T, H] in its compute dtype."""
    out = None
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            f = decoder(input_ids=rows[i : i + batch]).last_hidden_state
            if out is None:
                out = torch.empty(*rows.shape, f.shape[-1], dtype=f.dtype)
            out[i : i + len(f)] = f
            done = i + len(f)
            if done == len(rows) or (i // batch) % 50 == 0:
                el = time.perf_counter() - t0
                log(
                    f"target features {done}/{len(rows)} rows ({done * rows.shape[1] / max(el, 1e-9):.0f} tok/s)"
                )
    return out


def cached_features(path, decoder, rows: torch.Tensor, batch: int, source: str, log) -> torch.Tensor:
    """``target_features``, saved to / reused from ``path`` when its rows and model match."""
    if path and Path(path).is_file():
        saved = torch.load(path, weights_only=True)
        same_dtype = saved["features"].dtype == next(decoder.parameters()).dtype
        if saved.get("source") == source and same_dtype and torch.equal(saved["rows"], rows):
            log(f"reusing target features from {path}")
            return saved["features"]
        log(f"{path} holds other rows, another model or another dtype: recomputing")
    feats = target_features(decoder, rows, batch, log)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"source": source, "rows": rows, "features": feats}, path)
    return feats


class _ChainKV:
    """The head layer's K/V over an unrolled forward: each draft depth's keys after the last's."""

    def __init__(self):
        self.k = self.v = None

    def update(self, k, v, layer_idx, *args, **kwargs):
        self.k = k if self.k is None else torch.cat([self.k, k], 2)
        self.v = v if self.v is None else torch.cat([self.v, v], 2)
        return self.k, self.v


def unrolled(head, decoder, ids: torch.Tensor, f: torch.Tensor, depth: int, noise: bool, amp):
    """The head's outputs for drafts 1..``depth`` over rows ``ids`` [B, T] with target features ``f``.

    Depth s has one entry per position i < T - s: it sits at position i + s - 1, embeds x_{i+s}, is fed
    depth s-1's output at i (depth 1: the target's f_i) and predicts f_{i+s}, so it drafts x_{i+s+1}.
    As in drafting, it attends to the target's entries at positions <= i (depth 1's keys) and to its own
    chain's depth 2..s entries, which all sit at index i. Returns [(g_s, f[:, s:])] per depth.
    """
    bsz, t = ids.shape
    store, sizes, out = _ChainKV(), [], []
    feat = f[:, :-1].float()
    if noise:
        feat = feat + torch.rand_like(feat) * 0.2 - 0.1
    for s in range(1, min(depth, t - 1) + 1):
        n = t - s
        sizes.append(n)
        pos = (torch.arange(n) + s - 1)[None].expand(bsz, n)
        mask = torch.cat(
            [torch.ones(n, sizes[0], dtype=torch.bool).tril()]
            + [torch.eye(n, m, dtype=torch.bool) for m in sizes[1:]],
            1,
        )[None, None]
        emb = decoder.embed_tokens(ids[:, s:])
        with amp:
            g = head(feat[:, :n], emb, mask, pos, decoder.rotary_emb(emb, pos), store)
        out.append((g, f[:, s:]))
        feat = g.float()
    return out


def draft_vocabulary(lm_head, rows: torch.Tensor, feats: torch.Tensor, size: int, sample: int = 65536):
    """The ``size`` tokens the target most often predicts (its top-1 on up to ``sample`` training
    positions: what a verify accepts), ties and the rest by frequency in the training text."""
    vocab = lm_head.weight.shape[0]
    text = torch.bincount(rows.flatten(), minlength=vocab)
    f = feats.reshape(-1, feats.shape[-1])[:sample]
    with torch.no_grad():
        top1 = torch.cat([lm_head(f[i : i + 4096]).argmax(-1) for i in range(0, len(f), 4096)])
    pred = torch.bincount(top1, minlength=vocab)
    key = pred * (text.max() + 1) + text
    return key.argsort(descending=True)[: min(size, vocab)].sort().values


def cmd_train_draft(args) -> int:
    import zycompile
    from zycompile.draft_data import generate_replies, reply_rows
    from zycompile.errors import ZyError
    from zycompile.models import load_model
    from zycompile.runtime.eagle import EagleHead, load_head, save_head

    log = lambda msg: print(f"[train-draft] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    n_train = args.rows or args.steps * args.batch
    if min(args.steps, args.batch, args.seq_len, args.draft_vocab, n_train, args.val_rows) < 1:
        raise ZyError("--steps, --batch, --rows, --seq-len, --draft-vocab and --val-rows must be positive")
    if args.seq_len < 3:
        raise ZyError(f"--seq-len {args.seq_len}: expected at least 3 tokens per row")
    if not 1 <= args.unroll <= args.seq_len - 2:
        raise ZyError(f"--unroll {args.unroll}: expected 1 to --seq-len - 2 = {args.seq_len - 2}")
    if args.init and not Path(args.init).is_file():
        raise ZyError(f"--init {args.init}: no such file (a head written by `zycompile train-draft`)")
    if args.generate_replies and not args.replies:
        raise ZyError("--generate-replies N needs --replies FILE: the file the replies are written to")
    if args.replies and not args.generate_replies and not Path(args.replies).is_file():
        raise ZyError(f"--replies {args.replies}: no such file (--generate-replies N writes it)")
    if min(args.reply_len, args.reply_batch) < 1 or args.generate_replies < 0:
        raise ZyError("--reply-len, --reply-batch and --generate-replies must be positive")
    recipe = zycompile.load_recipe(args.recipe, args.overrides)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    if args.replies and not Path(args.replies).is_file():
        # before the training copy of the model is loaded: the generating one (compiled, with its
        # packed weights) is freed when this returns, so the two never sit in memory together
        log(f"generating {args.generate_replies} replies into {args.replies}")
        # prompts of at most --seq-len tokens: a row takes 2 x --seq-len of a prompt + reply
        generate_replies(
            recipe,
            args.replies,
            args.generate_replies,
            args.reply_len,
            args.reply_batch,
            args.seed,
            log,
            max_prompt_len=args.seq_len,
        )
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if cpu_has_bf16() else "float32"
    log(f"compute dtype {dtype}")
    loaded = load_model(recipe.model.source, dtype)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    model, tok = loaded.model.eval().requires_grad_(False), loaded.tokenizer
    if tok is None or getattr(tok, "chat_template", None) is None:
        raise ZyError(f"{recipe.model.source}: train-draft needs a tokenizer with a chat template")
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    if args.replies:
        rows = reply_rows(args.replies, args.seq_len, n_train + args.val_rows, args.seed)
    else:
        rows = token_rows(tok, args.seq_len, n_train + args.val_rows, args.seed)
    epochs = args.steps * args.batch / n_train
    log(
        f"{n_train} rows x {args.seq_len} tokens, {args.steps} steps x {args.batch} rows: {epochs:.2f} epochs"
    )
    feats = cached_features(args.features, decoder, rows, args.batch, recipe.model.source, log)
    if args.init:
        head, init_meta = load_head(args.init, model, torch.float32)
        head.train().requires_grad_(True)
        vocab_ids = head.vocab_ids
    else:
        init_meta = None
        vocab_ids = draft_vocabulary(lm_head, rows[args.val_rows :], feats[args.val_rows :], args.draft_vocab)
        head = EagleHead(model.config, type(decoder.layers[0]), vocab_ids)
    train, val = (
        (rows[args.val_rows :], feats[args.val_rows :]),
        (rows[: args.val_rows], feats[: args.val_rows]),
    )
    t_feat = time.perf_counter() - t_start

    w_draft = lm_head.weight[vocab_ids].detach()
    in_vocab = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    in_vocab[vocab_ids] = True
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    )

    def losses(ids: torch.Tensor, f: torch.Tensor, noise: bool):
        """Smooth-L1 + cross-entropy to the target's next-token distribution, averaged over the
        unrolled depths, and the last depth's top-1 agreement."""
        reg = ce = 0.0
        steps = unrolled(head, decoder, ids, f, args.unroll, noise, amp)
        with torch.no_grad(), amp:  # depth s's targets are f[:, s:]: one GEMM, sliced per depth
            targets = torch.softmax((f[:, 1:] @ w_draft.T).float(), -1)
        for s, (g, want) in enumerate(steps):
            target = targets[:, s:]
            with amp:
                logp = torch.log_softmax((g @ w_draft.T).float(), -1)
            reg = reg + torch.nn.functional.smooth_l1_loss(g.float(), want.float()) / len(steps)
            ce = ce - (target * logp).sum(-1).mean() / len(steps)
        top1 = (logp.argmax(-1) == target.argmax(-1)).float().mean()
        return reg, ce, top1

    def validate() -> tuple[list[float], float]:
        """Per draft depth, draft top-1 = the target's top-1 (over the full vocabulary, so a token
        outside the draft vocabulary counts as a miss) on held-out rows, the head fed its own features
        past depth 1; and how often the target's top-1 is drafable."""
        ids, f = val
        accs = []
        with torch.no_grad():
            with amp:  # depth s's targets are the target's top-1 from f[:, s:]: one LM head, sliced
                target = lm_head(f[:, 1:]).argmax(-1)
            for s, (g, _) in enumerate(unrolled(head, decoder, ids, f, max(args.unroll, 2), False, amp)):
                with amp:
                    draft = vocab_ids[(g @ w_draft.T).argmax(-1)]
                accs.append((draft == target[:, s:]).float().mean().item())
        return accs, in_vocab[target].float().mean().item()

    def depths(accs: list[float]) -> str:
        return ", ".join(f"depth {d} {a:.1%}" for d, a in enumerate(accs, 1))

    accs, drafable = validate()
    log(
        f"before training: held-out draft top-1 {depths(accs)} (target top-1 in the draft vocab {drafable:.1%})"
    )
    t0 = time.perf_counter()
    done, gen = 0, torch.Generator().manual_seed(args.seed)
    order = torch.empty(0, dtype=torch.long)
    while done < args.steps:
        if len(order) < args.batch:  # next epoch: every row once, in a new order
            order = torch.cat([order, torch.randperm(len(train[0]), generator=gen)])
        idx, order = order[: args.batch], order[args.batch :]
        reg, ce, top1 = losses(train[0][idx], train[1][idx], noise=True)
        loss = reg + args.ce_weight * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 0.5)
        opt.step()
        sched.step()
        done += 1
        if done % 25 == 1 or done == args.steps:
            el = time.perf_counter() - t0
            log(
                f"step {done}/{args.steps}: reg {reg.item():.3f} ce {ce.item():.3f} top1 {top1.item():.1%} ({el:.0f}s)"
            )
        if args.max_minutes and time.perf_counter() - t0 > args.max_minutes * 60:
            log(f"--max-minutes {args.max_minutes} reached after {done} steps")
            break
    accs, drafable = validate()
    log(
        f"after training: held-out draft top-1 {depths(accs)} (target top-1 in the draft vocab {drafable:.1%})"
    )
    acc = accs[0]
    meta = {
        "target": recipe.model.source,
        "hidden_size": model.config.hidden_size,
        "vocab_size": model.config.vocab_size,
        "steps": done,
        "epochs": round(done * args.batch / n_train, 2),
        "tokens": n_train * args.seq_len,
        "command": "zycompile " + " ".join(getattr(args, "argv", sys.argv[1:])),
        "val_top1": round(acc, 4),
        "val_top1_depths": [round(x, 4) for x in accs],
        "unroll": args.unroll,
        "data": f"replies {Path(args.replies).name}" if args.replies else "sharegpt",
        **(
            {"init_command": init_meta.get("command"), "init_steps": init_meta.get("steps")}
            if init_meta
            else {}
        ),
        "feature_seconds": round(t_feat),
        "train_seconds": round(time.perf_counter() - t0),
    }
    save_head(head, args.out, meta)
    log(
        f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB); total {time.perf_counter() - t_start:.0f}s"
    )
    return 0
