"""The ``zycompile`` command: run | bench | tune | recipe check | recipe show."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from torch.distributed import DistBackendError

from zycompile.errors import ZyError


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--recipe",
        default="smollm2-135m",
        help="recipe YAML path or shipped recipe name (default: smollm2-135m)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a recipe value, e.g. --set runtime.max_seq_len=1024 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zycompile",
        description="Compile Hugging Face causal LMs for fast serving, driven by a recipe.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log compile progress")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="generate text with the compiled model (streams, then prints stats)")
    _add_recipe_args(run)
    run.add_argument(
        "--prompt", required=True, help="the prompt (chat template applied if the model has one)"
    )
    run.add_argument(
        "--package", default=None, metavar="DIR", help="run an exported package instead of compiling"
    )
    run.add_argument("--max-new-tokens", type=int, default=128)
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    run.add_argument("--top-k", type=int, default=0, help="0 = off")
    run.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    run.set_defaults(func=cmd_run)

    export = sub.add_parser("export", help="write an AOTInductor package (graphs + safetensors + manifest)")
    _add_recipe_args(export)
    export.add_argument("--out", required=True, metavar="DIR", help="package directory to write")
    export.set_defaults(func=cmd_export)

    tune = sub.add_parser("tune", help="time every GEMM candidate for the recipe's shapes; write the winners")
    _add_recipe_args(tune)
    tune.add_argument("--out", default=None, help="database file (default: the path `db: auto` reads)")
    tune.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="CANDIDATE",
        help="a candidate not to time, e.g. split_n (repeatable)",
    )
    tune.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="CANDIDATE",
        help="an opt-in candidate to time too: inductor_cpp (a kernel compiled per weight and M; "
        "slow, memory-hungry, and it has not won a shape yet; repeatable)",
    )
    tune.add_argument(
        "--m",
        type=int,
        nargs="+",
        default=[],
        metavar="M",
        help="also tune these row counts for every weight, e.g. speculative verify widths k+1 (--m 3 5)",
    )
    tune.add_argument(
        "--new-only", action="store_true", help="time only the shapes the database does not hold yet"
    )
    tune.set_defaults(func=cmd_tune)

    recipe = sub.add_parser("recipe", help="check or show recipes")
    rsub = recipe.add_subparsers(dest="recipe_command", metavar="ACTION", required=True)
    check = rsub.add_parser("check", help="validate recipe files (exit 1 if any is bad)")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    check.set_defaults(func=cmd_recipe_check)
    show = rsub.add_parser("show", help="print the resolved recipe (defaults filled in) and its hash")
    show.add_argument("file", metavar="FILE")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    show.set_defaults(func=cmd_recipe_show)

    try:
        from zycompile.bench.cli import add_bench_parser
    except ImportError:  # the serving benchmark lives in its own module
        pass
    else:
        add_bench_parser(sub)
    from zycompile.train_draft import add_parser as add_train_draft_parser

    add_train_draft_parser(sub, _add_recipe_args)
    return parser


def cmd_recipe_check(args) -> int:
    from zycompile.recipe import load_recipe

    bad = 0
    for f in args.files:
        try:
            r = load_recipe(f, args.overrides)
        except ZyError as e:
            print(f"FAIL {e}")
            bad += 1
        else:
            print(f"ok   {f} ({len(r.passes)} passes, hash {r.compute_hash()})")
    return 1 if bad else 0


def cmd_recipe_show(args) -> int:
    from zycompile.recipe import load_recipe

    r = load_recipe(args.file, args.overrides)
    print(f"# {r.source_file}  hash {r.compute_hash()}")
    print(r.to_yaml(), end="")
    return 0


def _say(msg: str) -> None:
    """Progress on stderr, from rank 0 only when launched with torchrun."""
    if os.environ.get("RANK", "0") == "0":
        print(f"[zycompile] {msg}", file=sys.stderr, flush=True)


def cmd_export(args) -> int:
    import zycompile
    from zycompile.export.runtime import describe

    t0 = time.perf_counter()
    _say(f"loading {args.recipe} ...")
    opt = zycompile.optimize(None, args.recipe, overrides=args.overrides)
    opt.export(args.out, progress=lambda m: _say(f"{m} ..."))
    _say(f"wrote {args.out}: {describe(args.out)} (total {time.perf_counter() - t0:.0f}s)")
    return 0


def cmd_tune(args) -> int:
    import torch

    from zycompile.recipe import load_recipe
    from zycompile.tuning.tune import progress_bar, summary_lines, tune

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.runtime.threads:
        torch.set_num_threads(recipe.runtime.threads)
    say = lambda msg: print(f"[zycompile] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    db, rows = tune(
        recipe,
        args.out,
        progress=progress_bar(),
        log=say,
        skip=tuple(args.skip),
        include=tuple(args.include),
        extra_m=tuple(args.m),
        new_only=args.new_only,
    )
    print("\n".join(summary_lines(rows)))
    say(f"wrote {len(db.entries)} entries to {db.source}")
    return 0


def cmd_run(args) -> int:
    import zycompile

    t0 = time.perf_counter()
    if args.package:
        _say(f"loading package {args.package} ...")
        opt = zycompile.load(args.package)
    else:
        _say(f"loading {args.recipe} ...")
        opt = zycompile.optimize(None, args.recipe, overrides=args.overrides)
    gen = opt.generator()
    gen.on_compile = lambda msg: _say(f"{msg} ...")
    _say(f"model ready in {time.perf_counter() - t0:.1f}s")
    if not args.package and opt.recipe.parallel.mode != "none":
        from zycompile.parallel.memory import rank_memory

        mem = rank_memory(opt.model, gen.cache)
        _say(
            f"{opt.recipe.parallel.mode} over {opt.recipe.parallel.degree} ranks; rank 0 holds weights "
            f"{mem['weights'] / 2**20:.0f} MiB, KV cache {mem['kv_cache'] / 2**20:.0f} MiB"
        )
    # Compile before timing: a 2-token run on the same prompt builds its prefill and decode graphs,
    # so TTFT and tok/s below measure serving, not compilation.
    t0 = time.perf_counter()
    ids = gen.encode(args.prompt, chat=False if args.no_chat else None)
    opt.generate(ids, max_new_tokens=2, ignore_eos=True)
    _say(f"compiled in {time.perf_counter() - t0:.1f}s")
    main_rank = os.environ.get("RANK", "0") == "0"  # every rank generates; rank 0 prints

    printed = ""
    toks: list[int] = []

    def stream(_row: int, tok: int) -> None:
        nonlocal printed
        toks.append(tok)
        if not main_rank:
            return
        text = opt.tokenizer.decode(toks, skip_special_tokens=True) if opt.tokenizer else f" {tok}"
        if opt.tokenizer is None:
            printed += text
            print(text, end="", flush=True)
        elif len(text) > len(printed):
            print(text[len(printed) :], end="", flush=True)
            printed = text

    out = opt.generate(
        ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stream=stream,
    )
    if main_rank:
        print()
    mbu = f", MBU {out.mbu:.0%}" if out.mbu is not None else ""
    _say(
        f"TTFT {out.ttft_s * 1e3:.0f} ms, decode {out.decode_tok_s:.1f} tok/s ({len(out.tokens[0])} tokens){mbu}"
    )
    if out.speculative is not None:
        from zycompile.runtime.speculative import format_stats

        print(
            f"[zycompile] speculative {opt.recipe.speculative.method}: {format_stats(out.speculative)}",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command line, as typed (for provenance)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except ZyError as e:
        print(f"zycompile: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except DistBackendError as e:  # a peer rank died or a collective outlived parallel.timeout_s
        print(
            f"zycompile: error: rank {os.environ.get('RANK', '?')}: a collective failed ({e})",
            file=sys.stderr,
        )
        return 3
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
