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
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="compute dtype of the frozen target and autocast (bf16 GEMMs run ~2.4x fp32 here)",
    )
    p.add_argument(
        "--features",
        default=None,
        help="file to save the target features to, or load them from when it matches this run's rows",
    )
    p.add_argument("--max-minutes", type=float, default=None, help="stop training after this long (saves)")
    p.set_defaults(func=cmd_train_draft)


def token_rows(tokenizer, seq_len: int, count: int, seed: int) -> torch.Tensor:
    """``count`` rows of ``seq_len`` tokens: packed chat-rendered conversations, benchmarks' held out."""
    from zycompile.data import load_conversations

    convs = [c for c in load_conversations() if len(c["conversations"]) >= 2]
    random.Random(0).shuffle(convs)  # sample_sharegpt's order: its first conversations are held out
    train = convs[HELD_OUT:]
    random.Random(seed).shuffle(train)
    stream: list[int] = []
    need = seq_len * count
    for c in train:
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
        if saved.get("source") == source and torch.equal(saved["rows"], rows):
            log(f"reusing target features from {path}")
            return saved["features"]
        log(f"{path} holds other rows or another model: recomputing")
    feats = target_features(decoder, rows, batch, log)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"source": source, "rows": rows, "features": feats}, path)
    return feats


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
    from zycompile.errors import ZyError
    from zycompile.models import load_model
    from zycompile.runtime.eagle import EagleHead, save_head

    log = lambda msg: print(f"[train-draft] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    n_train = args.rows or args.steps * args.batch
    if min(args.steps, args.batch, args.seq_len, args.draft_vocab, n_train, args.val_rows) < 1:
        raise ZyError("--steps, --batch, --rows, --seq-len, --draft-vocab and --val-rows must be positive")
    if args.seq_len < 3:
        raise ZyError(f"--seq-len {args.seq_len}: expected at least 3 tokens per row")
    recipe = zycompile.load_recipe(args.recipe, args.overrides)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    loaded = load_model(recipe.model.source, args.dtype)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    model, tok = loaded.model.eval().requires_grad_(False), loaded.tokenizer
    if tok is None or getattr(tok, "chat_template", None) is None:
        raise ZyError(f"{recipe.model.source}: train-draft needs a tokenizer with a chat template")
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    rows = token_rows(tok, args.seq_len, n_train + args.val_rows, args.seed)
    epochs = args.steps * args.batch / n_train
    log(
        f"{n_train} rows x {args.seq_len} tokens, {args.steps} steps x {args.batch} rows: {epochs:.2f} epochs"
    )
    feats = cached_features(args.features, decoder, rows, args.batch, recipe.model.source, log)
    vocab_ids = draft_vocabulary(lm_head, rows[args.val_rows :], feats[args.val_rows :], args.draft_vocab)
    train, val = (
        (rows[args.val_rows :], feats[args.val_rows :]),
        (rows[: args.val_rows], feats[: args.val_rows]),
    )
    t_feat = time.perf_counter() - t_start

    head = EagleHead(model.config, type(decoder.layers[0]), vocab_ids)
    w_draft = lm_head.weight[vocab_ids].detach()
    in_vocab = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    in_vocab[vocab_ids] = True
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    )

    def losses(ids: torch.Tensor, f: torch.Tensor, noise: bool):
        t = ids.shape[1] - 1
        pos = torch.arange(t)[None].expand(ids.shape[0], t)
        mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
        emb = decoder.embed_tokens(ids[:, 1:])
        pe = decoder.rotary_emb(emb, pos)
        with torch.no_grad(), amp:
            target = torch.softmax((f[:, 1:] @ w_draft.T).float(), -1)  # g_p drafts x_{p+2}: from f_{p+1}
        f = f.float()
        feat = f[:, :-1] + (torch.rand_like(f[:, :-1]) * 0.2 - 0.1 if noise else 0)
        with amp:
            g = head(feat, emb, mask, pos, pe)
            logits = g @ w_draft.T
        reg = torch.nn.functional.smooth_l1_loss(g.float(), f[:, 1:])
        logp = torch.log_softmax(logits.float(), -1)
        ce = -(target * logp).sum(-1).mean()
        top1 = (logp.argmax(-1) == target.argmax(-1)).float().mean()
        return reg, ce, top1

    def validate() -> tuple[float, float]:
        """Draft top-1 = target's top-1 (over the full vocabulary, so a token outside the draft
        vocabulary counts as a miss) on held-out rows, and how often the target's top-1 is drafable."""
        ids, f = val
        with torch.no_grad():
            t = ids.shape[1] - 1
            pos = torch.arange(t)[None].expand(ids.shape[0], t)
            mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
            emb = decoder.embed_tokens(ids[:, 1:])
            with amp:
                g = head(f[:, :-1].float(), emb, mask, pos, decoder.rotary_emb(emb, pos))
                draft = vocab_ids[(g @ w_draft.T).argmax(-1)]
                target = lm_head(f[:, 1:]).argmax(-1)
        return (draft == target).float().mean().item(), in_vocab[target].float().mean().item()

    top1, drafable = validate()
    log(f"before training: held-out draft top-1 {top1:.1%} (target top-1 in the draft vocab {drafable:.1%})")
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
    acc, drafable = validate()
    log(f"after training: held-out draft top-1 {acc:.1%} (target top-1 in the draft vocab {drafable:.1%})")
    meta = {
        "target": recipe.model.source,
        "hidden_size": model.config.hidden_size,
        "vocab_size": model.config.vocab_size,
        "steps": done,
        "epochs": round(done * args.batch / n_train, 2),
        "tokens": n_train * args.seq_len,
        "command": "zycompile " + " ".join(getattr(args, "argv", sys.argv[1:])),
        "val_top1": round(acc, 4),
        "feature_seconds": round(t_feat),
        "train_seconds": round(time.perf_counter() - t0),
    }
    save_head(head, args.out, meta)
    log(
        f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB); total {time.perf_counter() - t_start:.0f}s"
    )
    return 0
