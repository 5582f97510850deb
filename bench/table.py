"""The closing table of `make bench`: every figure, its peer, its target and whether it holds."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    """One figure. `holds` is None for a figure printed without a target."""

    figure: str
    ours: str
    peer: str
    ratio: str
    target: str
    holds: bool | None


def at_least(ratio: float, target: float) -> tuple[str, str, bool]:
    return f"{ratio:.2f}x", f">= {target:g}x", ratio >= target


def at_most(ratio: float, target: float) -> tuple[str, str, bool]:
    return f"{ratio:.2f}x", f"<= {target:g}x", ratio <= target


def render(rows: list[Row]) -> str:
    """A Markdown table (it reads as one in a terminal too)."""
    head = ("figure", "ours", "peer", "ratio", "target", "holds")
    cells = [head] + [(r.figure, r.ours, r.peer, r.ratio, r.target,
                       "-" if r.holds is None else ("yes" if r.holds else "NO")) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]

    def line(c: tuple[str, ...]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(c, widths)) + " |"

    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(c) for c in cells[1:]]
    return "\n".join(out)
