"""Benchmark output: the terminal table, results.json, report.md and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _summary_rows(
    results: dict[str, dict[int, dict[str, float]]], concurrencies: list[int]
) -> list[list[str]]:
    """Header + one row per system: TTFT and per-request tok/s at c=1, aggregate tok/s at each c."""
    head = ["system", "TTFT median c=1 (ms)", "tok/s per request c=1"]
    rows = [head + [f"aggregate tok/s c={c}" for c in concurrencies]]
    for system, by_c in results.items():
        one = by_c.get(1, {})
        cells = [system, _fmt(one.get("ttft_median_ms")), _fmt(one.get("per_request_tok_s_median"))]
        rows.append(cells + [_fmt(by_c.get(c, {}).get("output_throughput")) for c in concurrencies])
    return rows


def table(results: dict[str, dict[int, dict[str, float]]], concurrencies: list[int]) -> str:
    """The terminal table, in the seed's shape."""
    rows = _summary_rows(results, concurrencies)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(results: dict[str, dict[int, dict[str, float]]], concurrencies: list[int], header: str) -> str:
    rows = _summary_rows(results, concurrencies)
    lines = [header, "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    lines.append("")
    lines.append(
        "| system | c | TTFT mean / median / p99 (ms) | TPOT median (ms) | ITL p99 (ms) | req/s | MBU | prefill MFU | tokens per $ |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for system, by_c in results.items():
        for c, m in by_c.items():
            lines.append(
                f"| {system} | {c} | {_fmt(m.get('ttft_mean_ms'))} / {_fmt(m.get('ttft_median_ms'))} / "
                f"{_fmt(m.get('ttft_p99_ms'))} | {_fmt(m.get('tpot_median_ms'))} | {_fmt(m.get('itl_p99_ms'))} | "
                f"{_fmt(m.get('request_throughput'), 2)} | {_pct(m.get('mbu'))} | {_pct(m.get('prefill_mfu'))} | {_fmt(m.get('tokens_per_dollar'), 0)} |"
            )
    spec = [(s, c, m) for s, by_c in results.items() for c, m in by_c.items() if "spec_acceptance_rate" in m]
    if spec:
        lines += [
            "",
            "| system | c | speculative acceptance | mean accepted / verify | tokens / target forward |",
        ]
        lines.append("|---|---|---|---|---|")
        for s, c, m in spec:
            lines.append(
                f"| {s} | {c} | {_pct(m['spec_acceptance_rate'])} | {_fmt(m['spec_mean_accepted'], 2)} | "
                f"{_fmt(m['spec_tokens_per_forward'], 2)} |"
            )
    return "\n".join(lines) + "\n"


def publish(lines: list[str], results_md: Path | None) -> None:
    """Print a benchmark's Markdown table and, unless ``results_md`` is None, append it there."""
    text = "\n".join(lines)
    print(text)
    if results_md is not None:
        with open(results_md, "a") as f:
            f.write(text + "\n")


def write_outputs(
    out_dir: Path, payload: dict[str, Any], md: str, timings: dict[str, dict[int, list]]
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2))
    (out_dir / "report.md").write_text(md)
    return [out_dir / "results.json", out_dir / "report.md", *plots(out_dir, payload["results"], timings)]


def plots(out_dir: Path, results: dict[str, dict[int, dict[str, float]]], timings) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, ax, name: str, xlabel: str, ylabel: str, title: str) -> Path:
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        return out_dir / name

    fig, ax = plt.subplots(figsize=(6, 4))
    for system, by_c in results.items():
        cs = sorted(by_c)
        ax.plot(cs, [by_c[c]["output_throughput"] for c in cs], marker="o", label=system)
    p1 = save(
        fig, ax, "throughput.png", "max concurrency", "aggregate output tokens/s", "Throughput vs concurrency"
    )

    fig, ax = plt.subplots(figsize=(6, 4))
    for system, by_c in timings.items():
        c = min(by_c)
        ttfts = sorted(t.ttft * 1e3 for t in by_c[c])
        ax.plot(ttfts, [(i + 1) / len(ttfts) for i in range(len(ttfts))], label=f"{system} (c={c})")
    p2 = save(fig, ax, "ttft.png", "TTFT (ms)", "fraction of requests", "TTFT distribution (CDF)")
    return [p1, p2]


def _fmt(x: float | None, digits: int = 1) -> str:
    if x is None or x != x:
        return "-"
    return f"{x:,.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.0%}"
