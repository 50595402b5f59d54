"""``zycompile train-draft``: train an EAGLE draft head (runtime/eagle.py) for the recipe's model.

Data: ShareGPT conversations rendered with the model's chat template and packed into ``--seq-len``
token rows. The conversations the benchmarks sample their prompts from (the first ``HELD_OUT`` of
``sample_sharegpt``'s seed-0 order) are left out, so a benchmark never measures on training text.

Per batch the frozen target gives its hidden states f (the LM head's input) and its next-token
distribution over the draft vocabulary; the head learns entry p = (f_p, x_{p+1}) -> f_{p+1}:
smooth-L1 to f_{p+1} plus 0.1 x cross-entropy to the target's distribution (EAGLE's loss), with
uniform noise on the input features so it tolerates its own predicted features when drafting.
The draft vocabulary is the ``--draft-vocab`` most frequent tokens of the training text.
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
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row (default 256)")
    p.add_argument("--draft-vocab", type=int, default=8192, help="draft vocabulary size (default 8192)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="compute dtype of the frozen target and autocast (bf16 GEMMs run ~2.4x fp32 here)",
    )
    p.add_argument("--max-minutes", type=float, default=None, help="stop early after this long (saves)")
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


def cmd_train_draft(args) -> int:
    import zycompile
    from zycompile.errors import ZyError
    from zycompile.models import load_model
    from zycompile.runtime.eagle import EagleHead, save_head

    log = lambda msg: print(f"[train-draft] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if min(args.steps, args.batch, args.seq_len, args.draft_vocab) < 1:
        raise ZyError("--steps, --batch, --seq-len and --draft-vocab must be positive")
    recipe = zycompile.load_recipe(args.recipe, args.overrides)
    torch.manual_seed(args.seed)
    loaded = load_model(recipe.model.source, args.dtype)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    model, tok = loaded.model.eval().requires_grad_(False), loaded.tokenizer
    if tok is None or getattr(tok, "chat_template", None) is None:
        raise ZyError(f"{recipe.model.source}: train-draft needs a tokenizer with a chat template")
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    val_rows = 4
    rows = token_rows(tok, args.seq_len, args.steps * args.batch + val_rows, args.seed)
    train, val = rows[val_rows:], rows[:val_rows]
    counts = torch.bincount(train.flatten(), minlength=model.config.vocab_size)
    vocab_ids = (
        counts.argsort(descending=True)[: min(args.draft_vocab, model.config.vocab_size)].sort().values
    )
    coverage = counts[vocab_ids].sum().item() / counts.sum().item()
    log(f"{train.numel()} training tokens; draft vocab {len(vocab_ids)} covers {coverage:.1%} of them")

    head = EagleHead(model.config, type(decoder.layers[0]), vocab_ids)
    w_draft = lm_head.weight[vocab_ids].detach()
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    )

    def batch_inputs(ids: torch.Tensor):
        with torch.no_grad():
            f = decoder(input_ids=ids).last_hidden_state
            target = torch.softmax((f @ w_draft.T).float(), -1)
        t = ids.shape[1] - 1
        pos = torch.arange(t)[None].expand(ids.shape[0], t)
        mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
        emb = decoder.embed_tokens(ids[:, 1:])
        return f, target, emb, mask, pos, decoder.rotary_emb(emb, pos)

    def losses(ids: torch.Tensor, noise: bool):
        f, target, emb, mask, pos, pe = batch_inputs(ids)
        f = f.float()
        feat = f[:, :-1] + (torch.rand_like(f[:, :-1]) * 0.2 - 0.1 if noise else 0)
        with amp:
            g = head(feat, emb, mask, pos, pe)
            logits = g @ w_draft.T
        g = g.float()
        reg = torch.nn.functional.smooth_l1_loss(g, f[:, 1:])
        logp = torch.log_softmax(logits.float(), -1)
        ce = -(target[:, 1:] * logp).sum(-1).mean()  # g_p drafts x_{p+2}: the target's guess from f_{p+1}
        top1 = (logp.argmax(-1) == target[:, 1:].argmax(-1)).float().mean()
        return reg, ce, top1

    def validate() -> float:
        with torch.no_grad():
            return losses(val, noise=False)[2].item()

    log(f"before training: draft top-1 = target top-1 on held-out rows {validate():.1%}")
    t0 = time.perf_counter()
    done = 0
    for step in range(args.steps):
        ids = train[step * args.batch : (step + 1) * args.batch]
        reg, ce, top1 = losses(ids, noise=True)
        loss = reg + 0.1 * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 0.5)
        opt.step()
        sched.step()
        done = step + 1
        if step % 10 == 0 or done == args.steps:
            el = time.perf_counter() - t0
            log(
                f"step {done}/{args.steps}: reg {reg.item():.3f} ce {ce.item():.3f} top1 {top1.item():.1%} ({el:.0f}s)"
            )
        if args.max_minutes and time.perf_counter() - t0 > args.max_minutes * 60:
            log(f"--max-minutes {args.max_minutes} reached after {done} steps")
            break
    acc = validate()
    log(f"after training: draft top-1 = target top-1 on held-out rows {acc:.1%}")
    meta = {
        "target": recipe.model.source,
        "hidden_size": model.config.hidden_size,
        "vocab_size": model.config.vocab_size,
        "steps": done,
        "tokens": done * args.batch * args.seq_len,
        "command": "zycompile " + " ".join(getattr(args, "argv", sys.argv[1:])),
        "val_top1": round(acc, 4),
        "train_seconds": round(time.perf_counter() - t0),
    }
    save_head(head, args.out, meta)
    log(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB)")
    return 0
