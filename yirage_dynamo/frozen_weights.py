"""One compiled program per set of frozen weights.

Freezing (passes/freezing.py, on by default for inference) makes a graph's parameters
constants of the compiled program. Dynamo does not know that: with nn modules inlined,
parameters are graph inputs guarded by their metadata only, and its cache matches
backends by `==` (two `torch.compile(..., backend="yirage")` wrappers with the same
options are equal). So a second model of the same architecture, compiled in the same
process, got the first model's compiled code, which went on computing with the first
model's weights.

`guard_frozen_weights` wraps what the backend returns for a Dynamo graph: each call
checks that the parameter inputs are the objects it was compiled for (weak references,
so a dead model's weights are not kept alive; ~20 µs for 300 parameters). For a new set
it compiles the Dynamo graph again and keeps that program beside the first. Graphs with
symbolic sizes run such calls as the plain Dynamo graph (eager) instead, with a warning:
recompiling outside Dynamo's trace would specialise their sizes. A Parameter whose
`.data` is replaced in place keeps its identity: freezing assumes that never happens
(the `freeze` option's documented contract).
"""

from __future__ import annotations

import logging
import operator
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import GraphModule

log = logging.getLogger("yirage_dynamo")

_deref = weakref.ref.__call__
# Programs kept per Dynamo graph, most recently used first; more sets than this means a
# loop over models, for which Dynamo's own recompile limit is the better judge.
MAX_WEIGHT_SETS = 8


def _symbolic(gm: GraphModule, example_inputs: list[Any]) -> bool:
    if any(isinstance(x, torch.SymInt) for x in example_inputs):
        return True
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("example_value")
        if isinstance(val, torch.SymInt):
            return True
        if isinstance(val, torch.Tensor) and not all(type(s) is int for s in val.shape):
            return True
    return False


class FrozenWeightsGuard:
    """Calls the program compiled for the parameter inputs it is given."""

    def __init__(
        self,
        fn: Callable,
        gm: GraphModule,
        example_inputs: list[Any],
        options: Any,
        compile_fn: Callable[[GraphModule, list[Any], Any], Callable],
        positions: list[int],
    ) -> None:
        self.gm = gm
        self.options = options
        self.compile_fn = compile_fn
        self.positions = positions
        take = operator.itemgetter(*positions)
        self.take = take if len(positions) > 1 else (lambda args: (take(args),))
        self.dynamic = _symbolic(gm, example_inputs)
        self.programs: list[tuple[list[weakref.ref], Callable]] = [(self._refs(example_inputs), fn)]
        self.recompiles = 0
        self.warned = False

    def _refs(self, args: Any) -> list[weakref.ref]:
        return [weakref.ref(p) for p in self.take(args)]

    def __call__(self, *args: Any) -> Any:
        boxed = len(args) == 1 and type(args[0]) is list
        flat = args[0] if boxed else args
        params = self.take(flat)
        for i, (refs, fn) in enumerate(self.programs):
            if all(map(operator.is_, map(_deref, refs), params)):
                if i:
                    self.programs.insert(0, self.programs.pop(i))
                return fn(*args)
        return self._new_weights(args, list(flat))

    def _new_weights(self, args: tuple, flat: list[Any]) -> Any:
        if self.dynamic:
            if not self.warned:
                self.warned = True
                log.warning(
                    "yirage: a graph compiled with frozen weights was called with other "
                    "parameters (another model of the same architecture?); it has symbolic "
                    "sizes, so such calls run uncompiled"
                )
            return self.gm(*flat)
        log.info("yirage: compiling this graph again for another model's weights")
        fn = self.compile_fn(self.gm, flat, self.options)
        self.recompiles += 1
        self.programs.insert(0, (self._refs(flat), fn))
        del self.programs[MAX_WEIGHT_SETS:]
        return fn(*args)


def guard_frozen_weights(
    fn: Callable,
    gm: GraphModule,
    example_inputs: list[Any],
    options: Any,
    compile_fn: Callable[[GraphModule, list[Any], Any], Callable],
) -> Callable:
    """`fn` wrapped in a FrozenWeightsGuard where freezing may have applied (see module)."""
    positions = [i for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter)]
    training = torch.is_grad_enabled() and any(example_inputs[i].requires_grad for i in positions)
    if not options.freeze or not positions or training:
        return fn
    return FrozenWeightsGuard(fn, gm, example_inputs, options, compile_fn, positions)
