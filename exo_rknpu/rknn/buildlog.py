"""Parse rknn-toolkit2's verbose build output: NPU placement, CPU fallbacks, cycle estimates, memory.

The compiler prints a "Network Layer Information Table" (one row per op: ID, OpType, DataType, Target,
shapes, Cycles(DDR/NPU/Total), RW(KB), FullName) and warnings such as
"Transpose will fallback to CPU, because input shape has exceeded the max limit ...". Input/Output operators
are always listed on the CPU; any other CPU op, or any fallback warning, is reported.
With dynamic_input the table is printed once per shape set; every table is read. Warnings and errors are printed
while a shape set is compiled, before its table: each table's `TableReport` holds those printed since the table
before it, and the input shapes of its InputOperator rows (which say which shape set it is).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

_ROW = re.compile(r"^(?:D RKNN: \[[^\]]*\]\s*)?(\d+)\s+(\S+)\s+(\S+)\s+(CPU|NPU|GPU)\s+.*?\s(\d+)/(\d+)/(\d+)\s+(\d+)\s*(\S*)\s*$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_INTERNAL = re.compile(r"Total Internal Memory Size:\s*([\d.]+)\s*KB")
_WEIGHT = re.compile(r"Total Weight Memory Size:\s*([\d.]+)\s*KB")
_IO_OPS = {"InputOperator", "OutputOperator"}
_INPUT_ROW = re.compile(r"InputOperator\s+\S+\s+CPU\s+\\\s+\(([\d,]+)\)\s.*InputOperator:(\S+)")


@dataclass
class TableReport:
    """One shape set of a build: its input shapes and what its compilation put on the CPU or complained about."""

    inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    cpu_ops: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def cpu_count(self) -> int:
        """Ops that run on the CPU in this shape set: CPU-placed ops plus fallback warnings."""
        return len(self.cpu_ops) + len(self.fallbacks)


@dataclass
class BuildReport:
    tables: int = 0  # layer tables seen (one per shape set)
    ops: int = 0  # ops in the first table
    cpu_ops: list[str] = field(default_factory=list)  # "OpType:FullName" placed on the CPU (not I/O)
    fallbacks: list[str] = field(default_factory=list)  # warning lines mentioning a CPU fallback
    cycles: list[int] = field(default_factory=list)  # summed Total cycles per table (compiler estimate)
    internal_kb: float | None = None
    weight_kb: float | None = None
    errors: list[str] = field(default_factory=list)  # "E ..." lines (the build may still succeed)
    per_table: list[TableReport] = field(default_factory=list)  # one per shape set, in the log's order

    @property
    def on_npu(self) -> bool:
        return not self.cpu_ops and not self.fallbacks

    def to_dict(self) -> dict:
        d = asdict(self)
        d["on_npu"] = self.on_npu
        return d


def parse_build_log(text: str) -> BuildReport:
    r = BuildReport()
    in_table = False
    cycles = 0
    pending = TableReport()  # what was printed since the last table
    for raw in text.splitlines():
        line = _ANSI.sub("", raw).rstrip()
        if "Network Layer Information Table" in line:
            in_table, cycles = True, 0
            r.tables += 1
            r.per_table.append(pending)
            pending = TableReport()
            continue
        if in_table:
            m = _ROW.match(line)
            if m:
                op, target, name = m.group(2), m.group(4), m.group(9)
                cycles += int(m.group(7))
                if r.tables == 1:
                    r.ops += 1
                inp = _INPUT_ROW.search(line)
                if inp:
                    r.per_table[-1].inputs[inp.group(2)] = tuple(int(d) for d in inp.group(1).split(","))
                if target != "NPU" and op not in _IO_OPS:
                    tag = name if ":" in name else (f"{op}:{name}" if name else op)
                    r.per_table[-1].cpu_ops.append(tag)
                    if tag not in r.cpu_ops:
                        r.cpu_ops.append(tag)
            elif line.endswith("-" * 20) and r.tables and cycles:
                in_table = False
                r.cycles.append(cycles)
            continue
        low = line.lower()
        if "fallback to cpu" in low or "fall back to cpu" in low:
            msg = re.sub(r"^\S+ RKNN: \[[^\]]*\]\s*", "", line).split("Warning:", 1)[-1].strip()
            pending.fallbacks.append(msg)
            if msg not in r.fallbacks:
                r.fallbacks.append(msg)
        if line.startswith("E ") or " E RKNN:" in line or line.startswith("E RKNN"):
            pending.errors.append(line)
            if line not in r.errors:
                r.errors.append(line)
        m = _INTERNAL.search(line)
        if m:
            r.internal_kb = max(r.internal_kb or 0.0, float(m.group(1)))
        m = _WEIGHT.search(line)
        if m:
            r.weight_kb = max(r.weight_kb or 0.0, float(m.group(1)))
    if r.per_table and (pending.fallbacks or pending.errors):  # printed after the last table: still its build's
        r.per_table[-1].fallbacks += pending.fallbacks
        r.per_table[-1].errors += pending.errors
    return r
