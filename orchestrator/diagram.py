"""A workflow's state diagram as an SVG document, drawn from its python-statemachine class.

Pure Python on purpose: no Graphviz binary to install on every host and container, nothing
fetched at run time, the same picture from `orchestrator dev` and production. The layout is a
layered one that suits workflows (mostly a line of steps with a failure state beside it):
each state sits in the column of its shortest distance from the initial state, the columns run
left to right, an edge to a later column leaves right and enters left, and any other edge (a
restart going back, a move within a column) loops below its states. Edges between the same two
states are drawn once, labelled with every event that takes them.

The answer for one instance marks, by element attributes a client (or a test) can read:
  the current state        `class="state current"`, `data-current="true"`, filled CURRENT_FILL;
  states it has been in    `class="state visited"`, filled VISITED_FILL;
  transitions it took      `class="transition taken"`, `data-taken="<times>"`, stroked TAKEN_STROKE.
Every state is a `<g id="state-<id>" data-state="<id>">`, every transition a
`<g data-from="<id>" data-to="<id>" data-events="<e1> <e2>">`.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from statemachine import StateMachine

SVG_NS = "http://www.w3.org/2000/svg"
CURRENT_FILL = "#40e0d0"
VISITED_FILL = "#e6f7f5"
PLAIN_FILL = "#ffffff"
TAKEN_STROKE = "#0b7a6f"
PLAIN_STROKE = "#555555"

FONT = 12
CHAR_W = 7.2  # an estimate of one character's width at FONT, for box sizes
BOX_H = 34
COL_GAP = 120
ROW_GAP = 36
MARGIN = 30
LOOP_DROP = 26


@dataclass
class _Edge:
    source: str
    target: str
    events: list[str]


def _machine(cls: type[StateMachine]) -> tuple[list[str], str, set[str], list[_Edge]]:
    """(state ids in declaration order, the initial one, final ones, edges merged per pair)."""
    states = [s.id for s in cls.states]
    initial = next(s.id for s in cls.states if s.initial)
    final = {s.id for s in cls.states if s.final}
    edges: dict[tuple[str, str], _Edge] = {}
    for state in cls.states:
        for t in state.transitions:
            for event in t.events:
                edge = edges.setdefault((t.source.id, t.target.id), _Edge(t.source.id, t.target.id, []))
                if event.id not in edge.events:
                    edge.events.append(event.id)
    return states, initial, final, list(edges.values())


def _columns(states: list[str], initial: str, edges: list[_Edge]) -> dict[str, int]:
    """Each state's column: the longest path to it from the initial state once the edges that
    go back (found depth-first, in declaration order: restarts, loops) are left out, so the
    steps read left to right and a failure state comes after the steps that fail into it."""
    out_edges: dict[str, list[str]] = {s: [] for s in states}
    for e in edges:
        out_edges[e.source].append(e.target)
    forward: dict[str, list[str]] = {s: [] for s in states}
    seen: set[str] = set()
    on_path: set[str] = set()
    order: list[str] = []

    def visit(node: str) -> None:  # a workflow has tens of states: recursion depth is no concern
        seen.add(node)
        on_path.add(node)
        for nxt in out_edges[node]:
            if nxt in on_path:
                continue  # goes back
            forward[node].append(nxt)
            if nxt not in seen:
                visit(nxt)
        on_path.discard(node)
        order.append(node)

    visit(initial)
    col = {s: 0 for s in states}
    for node in reversed(order):  # a topological order of the forward edges
        for nxt in forward[node]:
            col[nxt] = max(col[nxt], col[node] + 1)
    last = max(col.values()) + 1
    return {s: (col[s] if s in seen else last) for s in states}


def render(cls: type[StateMachine], current: str | None = None,
           taken: Iterable[tuple[str | None, str, str]] = ()) -> str:
    """The SVG document (text) of `cls`'s states and transitions.

    current: the state to highlight (an instance's state), or None;
    taken:   (from_state, to_state, event) of each transition an instance took, oldest first
             (its history rows; from_state None is its creation, entering the initial state).
    """
    states, initial, final, edges = _machine(cls)
    col = _columns(states, initial, edges)
    took = Counter((f, t) for f, t, _e in taken if f is not None)
    visited = {t for _f, t, _e in taken} | {f for f, _t, _e in taken if f}

    # -- place the boxes ----------------------------------------------------------------------
    width = {s: max(80.0, len(s) * CHAR_W + 24) for s in states}
    ncols = max(col.values()) + 1
    col_w = [max((width[s] for s in states if col[s] == c), default=80.0) for c in range(ncols)]
    col_x = [MARGIN + 40.0]
    for c in range(1, ncols):
        col_x.append(col_x[-1] + col_w[c - 1] + COL_GAP)
    rows: Counter[int] = Counter()
    pos: dict[str, tuple[float, float]] = {}  # centre of each box
    for s in states:
        c = col[s]
        pos[s] = (col_x[c] + col_w[c] / 2, MARGIN + BOX_H / 2 + rows[c] * (BOX_H + ROW_GAP))
        rows[c] += 1
    loops = [e for e in edges if col[e.target] <= col[e.source]]
    total_w = col_x[-1] + col_w[-1] + MARGIN
    total_h = MARGIN * 2 + max(rows.values()) * (BOX_H + ROW_GAP) + LOOP_DROP * (1 + len(loops) // 4)

    svg = ET.Element("svg", {"xmlns": SVG_NS, "width": f"{total_w:.0f}", "height": f"{total_h:.0f}",
                             "viewBox": f"0 0 {total_w:.0f} {total_h:.0f}", "font-family": "Helvetica, Arial, sans-serif",
                             "font-size": str(FONT), "data-workflow": getattr(cls, "type", "") or cls.__name__})
    ET.SubElement(svg, "title").text = f"{getattr(cls, 'type', '') or cls.__name__} state diagram"
    defs = ET.SubElement(svg, "defs")
    for name, color in (("arrow", PLAIN_STROKE), ("arrow-taken", TAKEN_STROKE)):
        marker = ET.SubElement(defs, "marker", {"id": name, "viewBox": "0 0 10 10", "refX": "10", "refY": "5", "markerUnits": "userSpaceOnUse",
                                                "markerWidth": "9", "markerHeight": "9", "orient": "auto-start-reverse"})
        ET.SubElement(marker, "path", {"d": "M 0 0 L 10 5 L 0 10 z", "fill": color})

    # -- edges first, so the boxes cover their ends ---------------------------------------------
    edge_layer = ET.SubElement(svg, "g", {"class": "transitions"})
    sx, sy = pos[initial]
    start = ET.SubElement(edge_layer, "g", {"class": "transition initial", "data-to": initial})
    ET.SubElement(start, "circle", {"cx": f"{sx - width[initial] / 2 - 30:.1f}", "cy": f"{sy:.1f}", "r": "6",
                                    "fill": "#222222"})
    ET.SubElement(start, "path", {"d": f"M {sx - width[initial] / 2 - 24:.1f} {sy:.1f} H {sx - width[initial] / 2:.1f}",
                                  "stroke": PLAIN_STROKE, "fill": "none", "marker-end": "url(#arrow)"})
    loop_no = 0
    for e in edges:
        (x1, y1), (x2, y2) = pos[e.source], pos[e.target]
        times = took.get((e.source, e.target), 0)
        attrs = {"class": "transition taken" if times else "transition", "data-from": e.source,
                 "data-to": e.target, "data-events": " ".join(e.events)}
        if times:
            attrs["data-taken"] = str(times)
        group = ET.SubElement(edge_layer, "g", attrs)
        ET.SubElement(group, "title").text = f"{e.source} → {e.target}: {', '.join(e.events)}"
        if col[e.target] > col[e.source]:
            ax, ay = x1 + width[e.source] / 2, y1
            bx, by = x2 - width[e.target] / 2, y2
            mid = (ax + bx) / 2
            d = f"M {ax:.1f} {ay:.1f} C {mid:.1f} {ay:.1f}, {mid:.1f} {by:.1f}, {bx:.1f} {by:.1f}"
            lx, ly = mid, (ay + by) / 2 - 4
        else:
            loop_no += 1
            drop = BOX_H / 2 + LOOP_DROP * (1 + (loop_no % 4))
            ax, ay = x1 + (6 if x1 <= x2 else -6), y1 + BOX_H / 2
            bx, by = x2 + (-6 if x1 <= x2 else 6), y2 + BOX_H / 2
            low = max(y1, y2) + drop
            d = f"M {ax:.1f} {ay:.1f} C {ax:.1f} {low:.1f}, {bx:.1f} {low:.1f}, {bx:.1f} {by:.1f}"
            lx, ly = (ax + bx) / 2, low - 2
        stroke = TAKEN_STROKE if times else PLAIN_STROKE
        ET.SubElement(group, "path", {"d": d, "fill": "none", "stroke": stroke,
                                      "stroke-width": "2.5" if times else "1.2",
                                      "marker-end": "url(#arrow-taken)" if times else "url(#arrow)"})
        label = ET.SubElement(group, "text", {"x": f"{lx:.1f}", "y": f"{ly:.1f}", "text-anchor": "middle",
                                              "font-size": str(FONT - 2), "fill": stroke, "stroke": "#ffffff",
                                              "stroke-width": "3", "paint-order": "stroke"})
        label.text = ", ".join(e.events)

    # -- states -------------------------------------------------------------------------------
    state_layer = ET.SubElement(svg, "g", {"class": "states"})
    for s in states:
        x, y = pos[s]
        kind = "current" if s == current else "visited" if s in visited else ""
        attrs = {"id": f"state-{s}", "class": f"state {kind}".strip(), "data-state": s}
        if s == current:
            attrs["data-current"] = "true"
        if s in final:
            attrs["data-final"] = "true"
        if s == initial:
            attrs["data-initial"] = "true"
        group = ET.SubElement(state_layer, "g", attrs)
        fill = CURRENT_FILL if s == current else VISITED_FILL if s in visited else PLAIN_FILL
        w = width[s]
        ET.SubElement(group, "rect", {"x": f"{x - w / 2:.1f}", "y": f"{y - BOX_H / 2:.1f}", "width": f"{w:.1f}",
                                      "height": str(BOX_H), "rx": "8", "fill": fill, "stroke": "#222222",
                                      "stroke-width": "2.5" if s == current else "1.2"})
        if s in final:  # a final state: a double border
            ET.SubElement(group, "rect", {"x": f"{x - w / 2 + 3:.1f}", "y": f"{y - BOX_H / 2 + 3:.1f}",
                                          "width": f"{w - 6:.1f}", "height": str(BOX_H - 6), "rx": "6",
                                          "fill": "none", "stroke": "#222222"})
        ET.SubElement(group, "text", {"x": f"{x:.1f}", "y": f"{y + FONT / 3:.1f}",
                                      "text-anchor": "middle"}).text = s
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(svg, encoding="unicode")
