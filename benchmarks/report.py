"""Markdown tables for the README from the JSON files the benchmark CLIs write.

python benchmarks/report.py [benchmarks/results]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def runs(data: dict) -> list[tuple[str, str, list[dict]]]:
    """(label, machine, rows) of each run a results file holds: one ({"machine", "rows"}), a list of
    them ({"runs": [...]}, each with its command), or named sides ({"before": run, "after": run})."""
    if "rows" in data:
        return [("", data.get("machine", ""), data["rows"])]
    if "runs" in data:
        return [(r.get("command", ""), r.get("machine", ""), r["rows"]) for r in data["runs"]]
    sides = [(name, run) for name, run in data.items() if isinstance(run, dict) and "rows" in run]
    return [(name, run.get("machine", ""), run["rows"]) for name, run in sides]


def contrastive_table(rows: list[dict]) -> str:
    cases = {}
    for r in rows:
        cases.setdefault((r["options"], r["B"], r["K"], r["D"]), {})[r["provider"]] = r
    out = [
        "| options | B | K | D | mmfast ms | GFLOP/s: mmfast / GEMMs | naive ms | naive ÷ mmfast | compiled ÷ mmfast"
        " | reference ÷ mmfast | extra MiB: mmfast / naive / compiled |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def value(p, key, fmt):
        return fmt.format(p[key]) if p and p.get(key) is not None else (p or {}).get("skipped", "-")

    for (opt, b, k, d), c in cases.items():
        m, gemm = c.get("mmfast"), c.get("gemm")
        n, comp = c.get("naive"), c.get("compiled")
        speedups = " | ".join(
            value(m, f"speedup_vs_{other}", "{:.2f}×") for other in ("naive", "compiled", "reference")
        )
        out.append(f"| {opt} | {b} | {k} | {d} | {value(m, 'fwd_bwd_ms', '{:.0f}')} "
                   f"| {value(m, 'gflops', '{:.0f}')} / {value(gemm, 'gflops', '{:.0f}')} "
                   f"| {value(n, 'fwd_bwd_ms', '{:.0f}')} | {speedups} "
                   f"| {' / '.join(value(p, 'extra_peak_mib', '{:.0f}') for p in (m, n, comp))} |")  # fmt: skip
    return "\n".join(out)


def pooling_table(rows: list[dict]) -> str:
    out = [
        "| mode | dtype | B | T | D | mmfast fwd / bwd ms | naive fwd / bwd ms | naive ÷ mmfast"
        " | extra MiB mmfast / naive |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cases = {}
    for r in rows:
        cases.setdefault((r["mode"], r["dtype"], r["B"], r["T"], r["D"]), {})[r["provider"]] = r
    for (mode, dtype, b, t, d), c in cases.items():
        m, n = c["mmfast"], c["naive"]
        out.append(f"| {mode} | {dtype} | {b} | {t} | {d} | {m['fwd_ms']:.1f} / {m['bwd_ms']:.0f} | "
                   f"{n['fwd_ms']:.1f} / {n['bwd_ms']:.0f} | {m['speedup_vs_naive']:.2f}× | "
                   f"{m.get('extra_peak_mib', 0):.0f} / {n.get('extra_peak_mib', 0):.0f} |")  # fmt: skip
    return "\n".join(out)


def distillation_table(rows: list[dict]) -> str:
    out = ["| B | D | D teacher | provider | fwd+bwd ms | extra MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        ms = f"{r['fwd_bwd_ms']:.0f}" if "fwd_bwd_ms" in r else r.get("skipped", "-")
        mib = f"{r['extra_peak_mib']:.0f}" if r.get("extra_peak_mib") is not None else "-"
        out.append(f"| {r['B']} | {r['D']} | {r['D_teacher']} | {r['provider']} | {ms} | {mib} |")
    return "\n".join(out)


def sigmoid_table(rows: list[dict]) -> str:
    """benchmarks/sigmoid_loss.py: each provider's time, over the bare GEMMs', and its extra memory."""
    out = ["| B | D | K | provider | fwd+bwd ms | ÷ GEMMs | extra MiB |", "|---" * 7 + "|"]
    for r in rows:
        ms = f"{r['fwd_bwd_ms']:.0f}" if "fwd_bwd_ms" in r else r.get("skipped", "-")
        over = f"{r['over_gemm']:.2f}" if r.get("over_gemm") is not None else "-"
        mib = f"{r['extra_peak_mib']:.0f}" if r.get("extra_peak_mib") is not None else "-"
        out.append(f"| {r['B']} | {r['D']} | {r['K']} | {r['provider']} | {ms} | {over} | {mib} |")
    return "\n".join(out)


def similarity_topk_table(rows: list[dict]) -> str:
    out = ["| Q | G | D | k | provider | wall ms | CPU ms | GFLOP/s | CPU ÷ gemm | same as mmfast | extra MiB |",
           "|---" * 11 + "|"]  # fmt: skip
    for r in rows:
        case = f"| {r['Q']} | {r['G']} | {r['D']} | {r['k']} | {r['provider']} "
        if "ms" not in r:
            out.append(case + f"| {r.get('skipped', '-')} | - | - | - | - | - |")
            continue
        over = f"{r['cpu_over_gemm']:.2f}" if "cpu_over_gemm" in r else "-"
        same = f"{100 * r['same_share']:.3f}%" if "same_share" in r else "-"
        numbers = (f"| {r['ms']:.0f} | {r['cpu_ms']:.0f} | {r['gflops']:.0f} | {over} | {same} "
                   f"| {r['extra_peak_mib']:.0f} |")  # fmt: skip
        out.append(case + numbers)
    return "\n".join(out)


def cross_device_table(rows: list[dict]) -> str:
    """benchmarks/contrastive_loss_cross_device.py: bytes sent per rank (max over ranks) and on paper."""
    out = ["| symmetric | backward | forward bytes sent | backward bytes sent | backward on paper (ring) "
           "| step ms (rank 0) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in (r for r in rows if "method" in r):
        ring = "backward_all_reduce" if r["method"].startswith("all_reduce") else "backward_reduce_scatter"
        out.append(f"| {r['symmetric']} | {r['method']} | {r['forward_sent_bytes_per_rank_max']:,} "
                   f"| {r['backward_sent_bytes_per_rank_max']:,} | {r['paper'][ring]:,.0f} "
                   f"| {r['step_ms_rank0']:.0f} |")  # fmt: skip
    return "\n".join(out)


def paired_table(rows: list[dict]) -> str:
    """--paired runs: each provider's time and its step-by-step ratio to its base (and to gemm1)."""
    out = ["| options | B | K | D | min ms | median ms | ÷ base | ÷ gemm1 |", "|---" * 8 + "|"]
    for r in rows:
        over_gemm1 = f"{r['over_gemm1']:.2f}×" if "over_gemm1" in r else "-"
        out.append(f"| {r['options']} | {r['B']} | {r['K']} | {r['D']} | {r['min_ms']:.1f} | {r['median_ms']:.1f} "
                   f"| {r['median_ratio']:.3f} ({r['base']}) | {over_gemm1} |")  # fmt: skip
    return "\n".join(out)


def late_interaction_table(rows: list[dict]) -> str:
    """benchmarks/late_interaction_loss.py: time, ÷ gemm and memory, or the out-of-memory failure under the cap."""
    out = ["| B | L_d | provider | wall ms | CPU ms | ÷ gemm | extra MiB | process peak MiB |", "|---" * 8 + "|"]
    for r in rows:
        head = f"| {r['B']} | {r['L_d']} | {r['provider']} |"
        if "ms" not in r:
            failure = r.get("out_of_memory") or r.get("skipped") or r.get("memory_error")
            cap = f"out of memory at the {r['cap_gib']:g} GiB cap: " if "out_of_memory" in r else ""
            out.append(f"{head} {cap}{failure} |" + " |" * 4)
            continue
        ratio = f"{r['over_gemm']:.2f}" if "over_gemm" in r else "-"
        peak = f"{r['process_peak_mib']:.0f}" if "process_peak_mib" in r else "-"
        out.append(f"{head} {r['ms']:.0f} | {r['cpu_ms']:.0f} | {ratio} | {r['extra_peak_mib']:.0f} | {peak} |")
    return "\n".join(out)


def generic_table(rows: list[dict]) -> str:
    """Any other rows: one column per scalar field of the first row."""
    keys = [k for k, v in rows[0].items() if isinstance(v, (str, int, float, bool))] if rows else []

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
    out += ["| " + " | ".join(cell(r.get(k, "-")) for k in keys) + " |" for r in rows]
    return "\n".join(out)


def table_for(stem: str, rows: list[dict]):
    """The table function of a results file: by its name, else by the shape of its rows."""
    by_name = next((fn for prefix, fn in TABLES.items() if stem.startswith(prefix)), None)
    if by_name is not None:
        return by_name
    if rows and "median_ratio" in rows[0]:
        return paired_table
    if rows and {"provider", "options", "B", "K", "D"} <= rows[0].keys():
        return contrastive_table
    return generic_table


TABLES = {
    "contrastive_loss_cross_device": cross_device_table,
    "pooling": pooling_table,
    "distillation_loss": distillation_table,
    "sigmoid_loss": sigmoid_table,
    "similarity_topk": similarity_topk_table,
    "late_interaction_loss": late_interaction_table,
}


def main(argv=None) -> int:
    root = Path((argv or sys.argv[1:] or ["benchmarks/results"])[0])
    for path in sorted(root.glob("*.json")):
        if path.name.startswith("gpu_report"):
            continue
        for label, machine, rows in runs(json.loads(path.read_text())):
            print(f"\n### {path.stem}{f' ({label})' if label else ''}\n\n{machine}\n")
            print(table_for(path.stem, rows)(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
