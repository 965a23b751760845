"""Printing helpers for `inspect` and `compile`: slices in layer order, CPU placement summarised, figures rounded.

What is printed is a summary for a person; `--json` always carries everything in full.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_DIGITS = re.compile(r"(\d+)")
# rknn-toolkit2: "Transpose will fallback to CPU, because input shape has exceeded the max limit, height(..) * ..."
_FALLBACK = re.compile(r"^(?P<op>\w+) will fall ?back to CPU,?\s*(?:because\s+)?(?P<reason>.*)$", re.IGNORECASE)


def slice_order(name: str) -> tuple:
    """Sort key for slice names: embed, then layer slices by layer number (layers.4 < layers.10), then head."""
    rank = 0 if name == "embed" else 2 if name == "head" else 1
    return (rank, [int(p) if p.isdigit() else p for p in _DIGITS.split(name)])


@dataclass(frozen=True)
class CpuPlacement:
    """Ops of one type the compiler left on the CPU: how many, and why (once)."""

    op: str
    count: int
    reason: str

    def __str__(self) -> str:
        return f"{self.op} x{self.count} ({self.reason})"


def summarize_cpu(cpu_ops: Iterable[str], fallbacks: Iterable[str]) -> list[CpuPlacement]:
    """Group the build report's CPU-placed ops ("OpType:FullName") and fallback warnings by op and reason.

    Fallback warnings differ only in their shapes (one per bucket), so the reason is cut at its first comma:
    "input shape has exceeded the max limit" once, with a count, instead of one line per shape.
    """
    counts: Counter[tuple[str, str]] = Counter()
    for tag in cpu_ops:
        counts[(tag.split(":", 1)[0], "placed by the compiler")] += 1
    for msg in fallbacks:
        m = _FALLBACK.match(msg.strip())
        if m:
            counts[(m["op"], m["reason"].split(",", 1)[0].rstrip("!. ") or "fallback")] += 1
        else:
            counts[("?", msg.strip().split(",", 1)[0])] += 1
    return [CpuPlacement(op, n, why) for (op, why), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def format_cpu(cpu_ops: Iterable[str], fallbacks: Iterable[str]) -> str:
    """One short phrase: "none", or "Transpose x8 (input shape has exceeded the max limit); ..."."""
    return "; ".join(str(p) for p in summarize_cpu(cpu_ops, fallbacks)) or "none"


def worst_cos(figures: Mapping[str, float]) -> str:
    """The lowest cosine among verification figures, six decimals (1 - cos stays visible), or "-" if unverified."""
    cos = [v for k, v in figures.items() if k.startswith("cos")]
    return f"{min(cos):.6f}" if cos else "-"


def verified_buckets(per_bucket: Mapping[str, Mapping[str, float]]) -> str:
    """Which buckets --verify ran and which was worst: "" if none, else " over 8 buckets (s1c64 ... b4c128), worst
    b4c128"."""
    if not per_bucket:
        return ""
    worst = min(per_bucket, key=lambda t: min((v for k, v in per_bucket[t].items() if k.startswith("cos")), default=2.0))
    return f" over {len(per_bucket)} buckets ({' '.join(per_bucket)}), worst {worst}"


def format_buckets(values: Iterable[int]) -> str:
    """Bucket sizes as "1,16,64"."""
    return ",".join(str(v) for v in values)


def count(n: float) -> str:
    """A large count, rounded for reading: 950, 12k, 7.7M."""
    if n < 1e3:
        return f"{n:.0f}"
    return f"{n / 1e3:.0f}k" if n < 1e6 else f"{n / 1e6:.1f}M"
