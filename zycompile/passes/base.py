"""The GraphPass protocol and helpers shared by every pass.

A pass is a small class in its own file. It reports how many places it matched; a pass that
matched nothing where the recipe says it should rewrite is a loud warning (an error with
``debug.strict``). A pass leaves the graph numerically equivalent or refuses to match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from typing import Any, ClassVar, Literal

import torch
import torch.fx

from zycompile import typed


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """For passes without options."""


@dataclasses.dataclass
class PassResult:
    modified: bool
    matches: int
    notes: list[str] = dataclasses.field(default_factory=list)  # why a candidate was refused, etc.


@dataclasses.dataclass
class PassContext:
    """What a pass may look at besides the graph."""

    recipe: Any  # zycompile.recipe.Recipe
    example_inputs: list[Any] = dataclasses.field(default_factory=list)
    graph_index: int = 0
    state: dict[str, Any] = dataclasses.field(
        default_factory=dict
    )  # per-optimize scratch shared across graphs
    exporting: bool = False  # the graph goes into a package (AOTInductor), not this process only


class GraphPass:
    """Base class for passes: ``name``, ``stage``, ``Options``, ``__call__(gm) -> PassResult``, ``uuid()``."""

    name: ClassVar[str]
    stage: ClassVar[Literal["pre_grad", "post_grad"]]
    Options: ClassVar[type] = NoOptions
    # Whether a model the pass is enabled for is expected to match at least once (else: warn).
    expect_matches: ClassVar[bool] = True
    # Whether ``prepare`` re-lays parameters in place (not possible on DTensor shards under TP).
    relays_weights: ClassVar[bool] = False
    # Why the pass cannot run in an exported package (e.g. it reads state kept in this process); the
    # export skips it and says so in the manifest. None: it runs in export as in the live compile.
    export_note: ClassVar[str | None] = None

    def __init__(self, opts: Any, ctx: PassContext):
        self.opts = opts
        self.ctx = ctx

    @staticmethod
    def prepare(model: torch.nn.Module, opts: Any) -> None:
        """Optional module transform run by ``optimize`` before tracing (weight layout, never math)."""

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def uuid(self) -> str:
        """Hash of the pass's source and options: part of Inductor's cache key."""
        src = inspect.getsource(type(self))
        blob = src + json.dumps(typed.to_plain(self.opts), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- small FX helpers -------------------------------------------------------------------------


def is_call(node: Any, *targets: Any) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def is_method(node: Any, *names: str) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_method" and node.target in names


def meta_val(node: Any) -> Any:
    """The fake tensor Dynamo (example_value) or AOT (val) recorded for a node, if any."""
    if not isinstance(node, torch.fx.Node):
        return None
    return node.meta.get("val", node.meta.get("example_value"))


def arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None
