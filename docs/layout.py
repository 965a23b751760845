"""Draw the package's rooms and the imports between them as docs/layout.svg (run: python docs/layout.py).

Read from the code, not written by hand: a room is a sub-package (or a top-level module) of exo_rknpu, its size the
lines of its .py files, and an arrow A -> B says some module of A imports one of B. Rooms are stacked in dependency
order (what imports nothing of the others at the bottom), so every arrow points down. Standard library only.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "exo_rknpu"
SHARED = {"errors", "config", "fileio", "__init__"}  # used by every room: drawn as a note, not as arrows


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def survey() -> tuple[dict[str, int], dict[str, set[str]]]:
    """Lines per room and room -> rooms it imports (shared modules left out)."""
    lines: dict[str, int] = defaultdict(int)
    edges: dict[str, set[str]] = defaultdict(set)
    for path in sorted(PKG.rglob("*.py")):
        mine = room(".".join(path.relative_to(ROOT).with_suffix("").parts))
        lines[mine] += len(path.read_text().splitlines())
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            for n in names:
                if n.startswith("exo_rknpu.") and room(n) != mine and room(n) not in SHARED:
                    edges[mine].add(room(n))
    return dict(lines), dict(edges)


def levels(rooms: list[str], edges: dict[str, set[str]]) -> dict[str, int]:
    """Level 0: imports no other room; otherwise one above the highest room it imports."""
    out: dict[str, int] = {}

    def level(r: str) -> int:
        if r not in out:
            out[r] = 0  # guards against a cycle (the architecture test refuses one)
            out[r] = 1 + max((level(d) for d in edges.get(r, ())), default=-1)
        return out[r]

    for r in rooms:
        level(r)
    return out


def svg(lines: dict[str, int], edges: dict[str, set[str]]) -> str:
    rooms = sorted(r for r in lines if r not in SHARED)
    lv = levels(rooms, edges)
    rows: dict[int, list[str]] = defaultdict(list)
    for r in rooms:
        rows[lv[r]].append(r)
    w, h, gap_x, gap_y = 150, 46, 30, 44
    width = max(len(v) for v in rows.values()) * (w + gap_x) + gap_x
    height = (max(rows) + 1) * (h + gap_y) + gap_y + 30
    pos: dict[str, tuple[float, float]] = {}
    for level_, names in rows.items():
        row_w = len(names) * (w + gap_x) - gap_x
        for i, r in enumerate(names):
            pos[r] = ((width - row_w) / 2 + i * (w + gap_x), height - 30 - (level_ + 1) * (h + gap_y))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="13">',
           '<defs><marker id="a" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto">'
           '<path d="M0,0 L8,4 L0,8 z" fill="#666"/></marker></defs>',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    for a in rooms:
        for b in sorted(edges.get(a, ())):
            if b in pos:
                (ax, ay), (bx, by) = pos[a], pos[b]
                out.append(f'<line x1="{ax + w / 2}" y1="{ay + h}" x2="{bx + w / 2}" y2="{by}" stroke="#999" '
                           f'marker-end="url(#a)"/>')
    for r in rooms:
        x, y = pos[r]
        fill = "#fde9c9" if r == "rknn" else "#dbe8f6"
        out.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="6" fill="{fill}" stroke="#456"/>')
        out.append(f'<text x="{x + w / 2}" y="{y + 20}" text-anchor="middle" font-weight="bold">{r}</text>')
        out.append(f'<text x="{x + w / 2}" y="{y + 37}" text-anchor="middle" fill="#444">{lines[r]} lines</text>')
    shared = ", ".join(f"{r} ({lines[r]})" for r in sorted(SHARED & set(lines)))
    out.append(f'<text x="{gap_x}" y="{height - 10}" fill="#444">used by every room: {shared}; '
               f'arrows: imports (only exo/ imports exo)</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    target = ROOT / "docs" / "layout.svg"
    target.write_text(svg(*survey()))
    print(f"wrote {target}")
