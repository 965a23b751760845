"""Draw docs/performance.md's plots and results table from `exo-rknpu bench --json` reports.

    python docs/perf/plot.py docs/perf/results.jsonl            # PNGs + the table in docs/performance.md
    python docs/perf/plot.py results.jsonl --out /tmp/plots --no-doc

Input: a file of bench reports, one JSON object per line (what docs/perf/measure.py writes). Output: decode.png
(decode tok/s) and memory.png (peak resident MiB), one group of bars per report: our runtime and the peers
measured in the same run. Bars are medians; the whiskers span the fastest and slowest run.

`--concurrency FILE`: also draw throughput.png from `exo-rknpu bench --concurrency N --json` reports (one per line):
batched against sequential aggregate decode, and per-request latency, by the number of requests in flight.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parents[1]
OURS = "exo-rknpu"
PEERS = ("transformers", "llama.cpp")
COLORS = {OURS: "#1f77b4", "transformers": "#ff7f0e", "llama.cpp": "#2ca02c"}
BEGIN, END = "<!-- results:begin (docs/perf/plot.py) -->", "<!-- results:end -->"


def load_reports(path: Path) -> list[dict]:
    """Every report in a JSON-lines file (blank lines skipped)."""
    reports = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not reports:
        raise SystemExit(f"{path}: no bench reports in it")
    return reports


def model_name(r: dict) -> str:
    """The model's short name: its alias, or the file / folder name without the extension."""
    return Path(r["model"]).name.removesuffix(".gguf")


def config_name(r: dict) -> str:
    split = "unsplit" if len(r["split"]) == 1 else f"{len(r['split'])} shards"
    return f"{model_name(r)}\n{r['backend']} {r['weights']}, {split}\n{r['threads']} thread{'s' * (r['threads'] > 1)}"


def median_load(r: dict) -> float | None:
    """The machine's median 1-minute load average over a report's runs (other jobs on the same cores)."""
    loads = [run["load_1m"] for run in r["runs"] if run.get("load_1m") is not None]
    return statistics.median(loads) if loads else None


def per_run(r: dict, contender: str, metric: str) -> list[float]:
    return [run[metric] for run in r["runs"] if run["contender"] == contender and run.get(metric) is not None]


def bars(reports: list[dict], metric: str, ylabel: str, title: str, out: Path) -> None:
    contenders = [OURS, *(p for p in PEERS if any(per_run(r, p, metric) for r in reports))]
    width = 0.8 / len(contenders)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(reports) + 2), 4.2), dpi=90)
    for i, c in enumerate(contenders):
        xs, mids, lo, hi = [], [], [], []
        for j, r in enumerate(reports):
            vals = per_run(r, c, metric)
            if vals:
                m = statistics.median(vals)
                xs.append(j + (i - (len(contenders) - 1) / 2) * width)
                mids.append(m)
                lo.append(m - min(vals))
                hi.append(max(vals) - m)
        label = OURS if c == OURS else c
        ax.bar(xs, mids, width, yerr=[lo, hi], capsize=3, color=COLORS[c], label=label)
        for x, m, h in zip(xs, mids, hi):  # the median, written above the whisker
            ax.annotate(f"{m:.0f}" if m >= 10 else f"{m:.1f}", (x, m + h), ha="center", va="bottom", fontsize=7,
                        xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(reports)), [f"{config_name(r)}\nload avg {fmt(median_load(r), '.1f')}" for r in reports],
                  fontsize=8)
    ax.set_ylabel(ylabel)
    shapes = sorted({(r["prompt_tokens"], r["gen_tokens"]) for r in reports})
    ax.set_title(f"{title} — prompt/decode tokens: {', '.join(f'{p}/{g}' for p, g in shapes)}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def throughput(reports: list[dict], out: Path) -> None:
    """throughput.png: for each `bench --concurrency` report, aggregate decode of the requests batched as a multiple
    of the same requests one after another (left), and batched per-request latency as a multiple of a lone step's
    (right), by requests in flight, in wall time (and dashed in CPU time where the report has it); the issue's
    goals dotted."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=90)
    for r in reports:
        n = [lv["requests"] for lv in r["levels"]]
        label = f"{r['label']}, " if "label" in r else ""  # e.g. which build, when a file compares two
        name = f"{model_name(r)} ({label}{r['weights']}, load avg {fmt(r.get('load_1m'), '.1f')})"
        (line,) = left.plot(n, [lv["gain"] for lv in r["levels"]], "o-", label=name)
        right.plot(n, [lv["latency_ratio"] for lv in r["levels"]], "o-", label=name)
        if "cpu_gain" in r["levels"][0]:  # reports that also give CPU time: dashed, same colour
            left.plot(n, [lv["cpu_gain"] for lv in r["levels"]], "x--", color=line.get_color(), label=f"{name}, CPU time")
            right.plot(n, [lv["cpu_latency_ratio"] for lv in r["levels"]], "x--", color=line.get_color(),
                       label=f"{name}, CPU time")
    left.axhline(3.0, color="grey", linestyle=":", label="goal at 8: at least 3x")
    right.axhline(1.5, color="grey", linestyle=":", label="goal: at most 1.5x")
    for ax, ylabel, title in (
        (left, "aggregate decode tok/s, batched / one at a time", "Aggregate decode gain from batching"),
        (right, "per-token latency / a lone request's", "Per-request latency while batched"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        ax.set_xlabel("requests in flight")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def table(reports: list[dict]) -> str:
    """Markdown: one row per contender per report (medians), with ours/peer ratios."""
    rows = ["| model | backend | weights | split | threads | load avg | bandwidth GB/s | contender | runs | decode tok/s "
            "| prefill tok/s | TTFT s | load s | peak RSS MiB | MB read/token | roofline | ours/peer decode "
            "| ours/peer peak RSS |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        cfg = (f"| {model_name(r)} | {r['backend']} | {r['weights']} | {' '.join(r['split'])} | {r['threads']} | {fmt(median_load(r), '.1f')} "
               f"| {r['machine']['bandwidth_gb_s']:.1f} ")
        entries = [(OURS, r, None)] + [(name, p, r["ratios"].get(name)) for name, p in r["peers"].items()]
        for name, f, rat in entries:
            n = f["n_runs"]
            if not n:
                rows.append(f"{cfg}| {name} | 0 | {f.get('note') or 'not measured'} |||||||||")
                continue
            mb = f.get("weight_bytes_per_token")
            rows.append(
                f"{cfg}| {name} | {n} | {fmt(f['decode_tok_s'], '.1f')} | {fmt(f['prefill_tok_s'], '.0f')} | "
                f"{fmt(f['ttft_s'], '.3f')} | {fmt(f['load_s'], '.2f')} | {fmt(f['peak_rss_mb'], '.0f')} | "
                f"{fmt(mb / 1e6 if mb else None, '.0f')} | {fmt(f.get('roofline_pct'), '.1f')}% | "
                f"{fmt(rat['decode_tok_s'], '.2f') + '×' if rat else ''} | {fmt(rat['peak_rss_mb'], '.2f') + '×' if rat else ''} |")
    methods = sorted({r["machine"]["bandwidth_method"] for r in reports})
    note = (f"\nMedians of alternating runs. Load avg: the machine's median 1-minute load average as the runs started "
            f"({reports[0]['machine']['cpus']} CPUs). Bandwidth, measured in each cell: {'; '.join(methods)}.\n")
    return "\n".join(rows) + "\n" + note


def update_doc(doc: Path, text: str) -> None:
    """Replace what lies between the results markers of `doc` with `text`."""
    s = doc.read_text()
    if BEGIN not in s or END not in s:
        raise SystemExit(f"{doc}: markers {BEGIN!r} ... {END!r} not found")
    head, rest = s.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="JSON-lines file of bench reports")
    ap.add_argument("--out", type=Path, default=DOCS / "perf", help="folder for the PNGs (default: docs/perf)")
    ap.add_argument("--doc", type=Path, default=DOCS / "performance.md", help="markdown file whose results table to rewrite")
    ap.add_argument("--no-doc", action="store_true", help="print the table instead of rewriting --doc")
    ap.add_argument("--concurrency", type=Path, help="JSON-lines file of `bench --concurrency --json` reports")
    a = ap.parse_args(argv)
    reports = load_reports(a.results)
    a.out.mkdir(parents=True, exist_ok=True)
    bars(reports, "decode_tok_s", "decode tokens/s (higher is better)", "Decode speed", a.out / "decode.png")
    bars(reports, "peak_rss_mb", "peak resident MiB (lower is better)", "Peak memory", a.out / "memory.png")
    if a.concurrency:
        throughput(load_reports(a.concurrency), a.out / "throughput.png")
    md = table(reports)
    if a.no_doc:
        print(md)
    else:
        update_doc(a.doc, md)
    print(f"wrote {a.out / 'decode.png'}, {a.out / 'memory.png'}" + ("" if a.no_doc else f" and the table in {a.doc}"),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
