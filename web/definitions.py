"""Workflow definitions: GET /workflow-types (each type's machine, steps and counts per state)
and the state diagrams, of a type and of one instance (orchestrator/diagram.py draws them)."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, Response

from orchestrator.diagram import render
from orchestrator.errors import NotFound
from orchestrator.workflow import Workflow, describe

from . import runtime
from .openapi import doc
from .schemas import WorkflowType, WorkflowTypeList

bp = Blueprint("definitions", __name__)
TAGS = ("workflows",)
SVG = "image/svg+xml"


def _type(name: str) -> type[Workflow]:
    cls = runtime().engine.registry.get(name)
    if cls is None:
        raise NotFound(f"unknown workflow type '{name}'; known: " + ", ".join(runtime().engine.registry.names()))
    return cls


def _item(cls: type[Workflow], counts: dict[str, int]) -> dict[str, Any]:
    return {**describe(cls, runtime().settings), "counts": counts}


@bp.get("/workflow-types")
@doc(WorkflowTypeList, errors=(), tags=TAGS)
def list_types() -> Any:
    """Every registered workflow type: states, events, steps and instances per state."""
    engine = runtime().engine
    counts = engine.counts()
    return {"items": [_item(engine.registry.get(n), counts[n]) for n in engine.registry.names()]}  # type: ignore[arg-type]


@bp.get("/workflow-types/<type>")
@doc(WorkflowType, errors=(404,), tags=TAGS)
def get_type(type: str) -> Any:  # noqa: A002 - named like the type field
    """One workflow type; 404 for an unknown one."""
    cls = _type(type)
    return _item(cls, runtime().engine.counts(cls.type)[cls.type])


@bp.get("/workflow-types/<type>/diagram.svg")
@doc(None, errors=(404,), tags=TAGS)
def type_diagram(type: str) -> Any:  # noqa: A002
    """The type's state diagram (image/svg+xml)."""
    return Response(render(_type(type)), mimetype=SVG)


@bp.get("/sagas/<instance:instance_id>/diagram.svg")
@doc(None, errors=(400, 404), tags=TAGS)
def instance_diagram(instance_id: str) -> Any:
    """The instance's state diagram: its current state filled (`data-current="true"`), the
    transitions it took drawn bold (`class="transition taken"`, `data-taken` = times)."""
    type_name, state, taken = runtime().engine.history_path(instance_id)
    return Response(render(_type(type_name), current=state, taken=taken), mimetype=SVG)
