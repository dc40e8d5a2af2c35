"""Staged KV-cache writes, so that a decode step started ahead writes nothing shared
(runtime/run_ahead.py; no-Inductor CUDA path, after lowering/cuda_kv_write.py).

A step run-ahead starts before it is asked for writes its new K/V row into the cache on a
side stream; if the caller stops there and eager code writes the same cache slot (a
multi-turn prefill), the two writes are unordered. Staged, the step keeps its row apart
and the runner commits it on the caller's stream only when the step is handed out:

before (per layer):                                after:
    q2 = rotary_kv_write(q, k, v, cos, sin,            q2 = rotary_kv_stage(q, k, v, cos, sin,
                         kc, vc, offsets, counter)              ks, vs, spos, T, offsets, counter)
    (kc, vc written in place)                          (ks, vs: [B, Hkv, 1, D]; spos: [1])
    o = decode_attention(q2, kc, vc, ...)              o = decode_attention(q2, kc, vc, ...,
                                                               k_stage=ks, v_stage=vs, stage_pos=spos)
                                                   commit, after the step (runner):
                                                       kv_commit(kc, vc, ks, vs, spos)
                                                       (kc[:, :, spos] = ks, the same for v)

`ks, vs, spos` are new graph inputs, appended after the others. A `StagedProgram` fills
them on every call with the stage buffers of the caches it is given, from the step's
`StageTable`: regional layers share one program, so the buffers go by the caches they
stand in for. The table is the runner's `commit` (runtime/cuda_graphs.py).

All of a graph's cache writes are staged or none: a graph with a cache written any other
way, or used after its write by anything but decode attention (the cache returned, S > 1),
is left as is.
On with run_ahead="auto" (which runs ahead only a staged step), or with any run-ahead
and YIRAGE_CUDA_KV_STAGE=on; off otherwise (see `enabled`).
"""

from __future__ import annotations

import contextvars
import dataclasses
import os
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import GraphModule, Node
from yirage_dynamo.passes.context import node_val, set_fake_val

STAGE_ENV = "YIRAGE_CUDA_KV_STAGE"
# Cache writes left unfused (YIRAGE_CUDA_KV_WRITE=off, or a layer the fusion refused).
_OTHER_CACHE_WRITES = (torch.ops.aten.index_copy_.default, torch.ops.aten.index_put_.default)
# The table of the step being compiled, for its regional pieces (lowering/cuda.py).
CURRENT: contextvars.ContextVar[StageTable | None] = contextvars.ContextVar(
    "yirage_kv_stage_table", default=None
)


def enabled(options: Any) -> bool:
    """Whether to stage: only with run-ahead on. YIRAGE_CUDA_KV_STAGE "on": with any
    run-ahead; "off": never; unset: with run_ahead="auto", which runs ahead only a staged
    step. Another value raises ValueError."""
    value = os.environ.get(STAGE_ENV, "").strip().lower()
    if value not in ("on", "off", ""):
        raise ValueError(f"{STAGE_ENV}={value!r}: expected 'on' or 'off'")
    if value == "":
        return options.run_ahead == "auto"
    return value == "on" and bool(options.run_ahead)


@dataclasses.dataclass
class Stage:
    """One layer's staged row: keys and values [B, Hkv, 1, D], and its cache position."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    cache: weakref.ref  # the key cache it stands in for: dead, the stage can go


class StageTable:
    """The stage buffers of one compiled step, by the caches they stand in for, and the
    ones the last call used: what its commit writes."""

    def __init__(
        self,
        commit_row: Callable[..., None] | None = None,
        commit_rows: Callable[[list[tuple]], bool] | None = None,
    ) -> None:
        # (k_cache, v_cache, k_stage, v_stage, stage_pos): the CUDA lowering's one-launch
        # `yirage_cuda::kv_commit`; two `index_copy_`s without it.
        self.commit_row = commit_row or _index_copy_row
        # All rows at once (lowering/triton_kv_write.py `KvCommitTable`), True where it
        # did; else a commit_row per row.
        self.commit_rows = commit_rows
        self.stages: dict[tuple[int, int], Stage] = {}
        self.used: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, Stage]] = {}
        self.programs = 0  # staged programs reading from this table

    def use(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> Stage:
        """The caches' stage for this call (made on first sight: a captured graph keeps
        its address, so a stage lives as long as its cache)."""
        key = (k_cache.data_ptr(), v_cache.data_ptr())
        if key in self.used:
            # A step that never reached its commit: a CUDA-graph capture that failed (the
            # runner then runs the step eagerly, and commits that). Nothing of it ran.
            self.used.clear()
        stage = self.stages.get(key)
        if stage is None or stage.cache() is None:
            self.stages = {k: s for k, s in self.stages.items() if s.cache() is not None}
            # Empty, not zeroed: the step writes a stage before anything reads it, and a
            # fill made here during a capture (a new cache) would be replayed every step.
            stage = Stage(
                torch.empty_like(k_cache[:, :, :1], memory_format=torch.contiguous_format),
                torch.empty_like(v_cache[:, :, :1], memory_format=torch.contiguous_format),
                torch.empty(1, dtype=torch.int64, device=k_cache.device),
                weakref.ref(k_cache),
            )
            self.stages[key] = stage
        self.used[key] = (k_cache, v_cache, stage)
        return stage

    def prepare_capture(self) -> None:
        """Before the commit is captured (the runner, after capturing the step): what the
        one-launch commit must build on the host."""
        prepare = getattr(self.commit_rows, "prepare", None)
        if prepare is not None and len(self.used) > 1:
            prepare(self._used_rows())

    def _used_rows(self) -> list[tuple[torch.Tensor, ...]]:
        """(k_cache, v_cache, k_stage, v_stage, stage_pos) of every cache the last call used."""
        return [(kc, vc, s.k, s.v, s.pos) for kc, vc, s in self.used.values()]

    def commit(self, args: list[Any] | None = None) -> None:
        """Every row the last call staged, into its cache (on the current stream). The
        runner passes the step's inputs; the table already holds the caches it staged for."""
        rows = self._used_rows()
        self.used.clear()
        if len(rows) > 1 and self.commit_rows is not None and self.commit_rows(rows):
            return
        for row in rows:
            self.commit_row(*row)

    __call__ = commit  # the runner's `commit(args)`


class AddressTables:
    """Device tables of the rows' addresses (k cache, v cache, k stage, v stage, stage
    position per row) for the CUDA lowering's one-launch commit (lowering/
    triton_kv_write.py `KvCommitTable`). A table is built on the host, which a CUDA-graph
    capture cannot record: the runner's `prepare_capture` (or an eager commit) builds it,
    and the captured commit finds it by the rows' addresses. Each is kept while its
    caches live: a captured commit graph reads it at every replay."""

    def __init__(self) -> None:
        self.tables: dict[tuple, tuple[torch.Tensor, list[weakref.ref]]] = {}

    def __len__(self) -> int:
        return len(self.tables)

    def get(self, rows: list[tuple[torch.Tensor, ...]], build: bool) -> torch.Tensor | None:
        """The rows' table; None where there is none and `build` is False, or where the
        rows differ in layout (one kernel launch takes the first row's for all)."""
        layout = _row_layout(rows[0])
        if layout is None or any(_row_layout(r) != layout for r in rows[1:]):
            return None
        addresses = [t.data_ptr() for r in rows for t in r]
        key = (layout, *addresses)
        found = self.tables.get(key)
        if found is None and build:
            self.tables = {
                k: v for k, v in self.tables.items() if all(c() is not None for c in v[1])
            }
            table = torch.tensor(addresses, dtype=torch.int64, device=rows[0][0].device)
            found = self.tables[key] = (table, [weakref.ref(r[0]) for r in rows])
        return None if found is None else found[0]


def _row_layout(row: tuple[torch.Tensor, ...]) -> tuple | None:
    """What one launch takes from the first row for all: shapes, strides and one element
    type (None: a row it cannot commit)."""
    k_cache, v_cache, k_stage, v_stage, pos = row
    tensors = (k_cache, v_cache, k_stage, v_stage)
    if any(t.stride(-1) != 1 or t.dtype != k_cache.dtype for t in tensors):
        return None
    if pos.dtype != torch.int64 or k_cache.shape != v_cache.shape:
        return None
    return (k_cache.shape, k_stage.shape, k_cache.dtype, *(t.stride() for t in tensors))


def _index_copy_row(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_stage: torch.Tensor,
    v_stage: torch.Tensor,
    stage_pos: torch.Tensor,
) -> None:
    k_cache.index_copy_(2, stage_pos, k_stage)
    v_cache.index_copy_(2, stage_pos, v_stage)


class StagedProgram:
    """A staged graph's program, called as the unstaged one was: the stage buffers of the
    caches at `caches` ((key, value) input positions, one pair per staged write) are
    appended to the inputs."""

    def __init__(self, fn: Callable, caches: list[tuple[int, int]], table: StageTable) -> None:
        self.fn = fn  # boxed: called with one list
        self.caches = caches
        self.table = table
        table.programs += 1

    def __call__(self, *args: Any) -> Any:
        flat = list(args[0]) if len(args) == 1 and type(args[0]) is list else list(args)
        for k_at, v_at in self.caches:
            stage = self.table.use(flat[k_at], flat[v_at])
            flat += [stage.k, stage.v, stage.pos]
        return self.fn(flat)

    def commit_record(self, gm: GraphModule, kernels: Any, stand_in: Callable) -> Callable:
        """The one-launch commit's launch for this program's rows, to precompile
        (lowering/cuda.py): the layout of `gm`'s first cache pair and of its stage inputs,
        the last 3 per pair in `gm`'s placeholders (only the caches' layout is read)."""
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        first_stage = len(placeholders) - 3 * len(self.caches)
        k_cache, v_cache = (node_val(placeholders[i]) for i in self.caches[0])
        k_stage, v_stage = placeholders[first_stage : first_stage + 2]
        return lambda: kernels.KvCommitTable.record_launch(
            k_cache, v_cache, stand_in(k_stage), stand_in(v_stage)
        )


def staged_program(
    gm: GraphModule, table: StageTable, write_op: Any, stage_op: Any, attention_op: Any
) -> StagedProgram | str:
    """`gm` with every KV write staged (`stage_kv_writes`), called through a
    StagedProgram; or why nothing was staged. The program calls the rewritten forward: a
    plain GraphModule's `forward`, bound before the rewrite, keeps the old signature (a
    lazy one re-dispatches, which hid this until a graph compiled outside Dynamo's
    compile context, for a second model's weights, frozen_weights.py, was not lazy)."""
    from torch._functorch.aot_autograd import make_boxed_func

    caches = stage_kv_writes(gm, write_op, stage_op, attention_op)
    if isinstance(caches, str):
        return caches
    return StagedProgram(make_boxed_func(gm.forward), caches, table)


def stage_kv_writes(
    gm: GraphModule, write_op: Any, stage_op: Any, attention_op: Any
) -> list[tuple[int, int]] | str:
    """Stage every KV write of `gm` (see module); the (key, value) cache input positions
    per write, or why nothing was staged. The ops are parameters so the CPU tests can run
    the rewrite with reference ops."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    index = {p: i for i, p in enumerate(placeholders)}
    writes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is write_op]
    if not writes:
        return "no fused rotary + KV write"
    other = next((n for n in gm.graph.nodes if n.target in _OTHER_CACHE_WRITES), None)
    if other is not None:
        return f"{other.name} writes a cache the fused kernel does not (all or none are staged)"
    if len({w.args[5] for w in writes}) < len(writes):
        # One stage per cache: a second row would need the first in the cache already.
        return "two writes into one cache (more than one new position per cache)"
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for w in writes:
        why = _why_not(w, index, order, attention_op)
        if why:
            return f"{w.name}: {why}"
    caches = []
    last = placeholders[-1]
    for j, w in enumerate(writes):
        q, k, v, cos, sin, kc, vc, pos, *base = w.args
        kv, vv = node_val(kc), node_val(vc)
        stage_inputs = []
        for name, like in (("k", kv), ("v", vv), ("pos", None)):
            with gm.graph.inserting_after(last):
                last = gm.graph.placeholder(f"_yirage_stage_{name}_{j}")
            last.meta["val"] = _fake_like(kv, like)
            stage_inputs.append(last)
        ks, vs, spos = stage_inputs
        with gm.graph.inserting_before(w):
            new = gm.graph.call_function(
                stage_op, (q, k, v, cos, sin, ks, vs, spos, kv.shape[2], pos, *base)
            )
        set_fake_val(gm, new)
        order[new] = order[w]
        new.meta["yirage_origin"] = w.meta.get("yirage_origin", w.name) + "+staged"
        w.replace_all_uses_with(new)
        gm.graph.erase_node(w)
        for a in _after(kc, new, order):
            a.kwargs = {**a.kwargs, "k_stage": ks, "v_stage": vs, "stage_pos": spos}
        caches.append((index[kc], index[vc]))
    gm.graph.lint()
    gm.recompile()
    return caches


def _why_not(
    write: Node, index: dict[Node, int], order: dict[Node, int], attention_op: Any
) -> str | None:
    q, _, _, _, _, kc, vc = write.args[:7]
    if kc not in index or vc not in index:
        return "a cache that is not a graph input"
    vals = [node_val(n) for n in (q, kc, vc)]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in vals):
        return "a value without metadata, or not [B, H, S, D]"
    if not all(type(d) is int for t in vals for d in t.shape):
        return "symbolic sizes (comparing them would specialise them)"
    if vals[0].shape[2] != 1:
        return "not one new position (S == 1)"
    for cache, arg in ((kc, 1), (vc, 2)):
        # Before the write a use sees the cache as it was, staged or not; after it, only
        # decode attention can be given the staged row.
        for u in _after(cache, write, order):
            if u.target is not attention_op or u.args[arg] is not cache:
                return f"the cache is used by {u.name} ({u.target}) after the write"
            if any(k in u.kwargs for k in ("k_stage", "v_stage", "stage_pos")):
                return f"{u.name} is staged already"
    return None


def _after(cache: Node, write: Node, order: dict[Node, int]) -> list[Node]:
    return [u for u in cache.users if order[u] > order[write]]


def _fake_like(cache_val: Any, like: Any) -> Any:
    """A fake value for a stage input: one row of `like`'s cache, or the int64 position."""
    fake_mode = torch._guards.detect_fake_mode([cache_val])
    shape, dtype = (1,), torch.int64
    if like is not None:
        shape, dtype = (*like.shape[:2], 1, like.shape[3]), like.dtype
    make = lambda: torch.empty(shape, dtype=dtype, device=cache_val.device)  # noqa: E731
    if fake_mode is None:
        return make()
    with fake_mode:
        return make()
