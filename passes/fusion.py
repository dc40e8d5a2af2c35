"""Group pointwise ops, reductions and views into fused regions (device-neutral).

A region becomes one `call_module` node whose submodule is the region's subgraph; the
lowering renders each submodule as one kernel (or runs it as its ATen reference). The
pass reads only the lowering's declared `Capabilities` (fusible_ops, dtypes, device_type,
generates_kernels): it is a no-op for lowerings that generate no kernels.

before:                                     after:
    h = add(x, y)                              fused_0 = call_module[fused_0](x, y, w)
    p = pow(h, 2); m = mean(p, [-1], True)     h = getitem(fused_0, 0)
    r = rsqrt(add(m, 1e-6))                    o = getitem(fused_0, 1)
    o = mul(w, mul(h, r))                      v = view(o, [1, 576])      (extern view)
    v = view(o, [1, 576]); mm(v, wt)           mm(v, wt)                  (extern GEMM)

Custom ops the lowering lists in fusible_ops (e.g. "yirage.rms_norm") are first expanded
into ATen by tracing their reference implementation, so they fuse with their neighbours.

Region rules (what a renderer can turn into one loop nest):
  * region outputs have numel F (the domain) or, with reductions, the row size; all
    reductions share input shape (numel F) and reduced dims, and pointwise nodes after them
    may work on row values ("epilogue"); values of other sizes may sit inside (e.g. the
    halves of rotate-half), since the renderer indexes every node in its own coordinates.
    A compute node or `cat` of another size moves the domain to its size while no value of
    the old size is needed outside (rotate-half: neg on half rows, cat and x*cos + r*sin on
    full rows: one kernel);
  * GEMM/conv/SDPA/embedding/index/mutating ops are never fused (not in fusible_ops);
  * the region runs where its last node was: every outside user of a region node must come
    after that point (this also rules out cycles), and no mutating op may lie between the
    region's first and last node (a moved read would see the mutation);
  * a view whose result is needed outside the region stays an (extern, free) view of the
    region's output instead of being materialised, unless the viewed value is needed
    nowhere else: then the kernel writes the view's layout (no view call after the kernel,
    e.g. RMSNorm -> view -> GEMM); regions that only move data are undone;
  * views of non-fused values (GEMM outputs, inputs) are copied per fusible user first, so
    that q's and k's RoPE reading one fused-QKV output do not share a region.
"""

from __future__ import annotations

import operator
from typing import Any

import sympy
import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx._lazy_graph_module import _LazyGraphModule

from .cleanup import _impure
from .context import PassContext

_REDUCTIONS = {
    "sum": ("dim_IntList", "default"),
    "mean": ("dim", "default"),
    "amax": ("default",),
    "amin": ("default",),
    "var": ("correction",),
    "prims.sum": ("default",),
    "prims.var": ("default",),
    "prims.amax": ("default",),
}
# Layout-only ops (shared with the C renderer, which turns them into index arithmetic).
VIEW_OPS = {
    "view",
    "reshape",
    "_unsafe_view",
    "unsqueeze",
    "squeeze",
    "permute",
    "transpose",
    "t",
    "expand",
    "slice",
    "select",
    "alias",
    "clone",
    "prims.broadcast_in_dim",
    "prims.reshape",
    "prims.squeeze",
    "prims.view_of",
}
# Views whose result covers exactly the memory of their input (a permutation of the same
# elements): such a view may be written by a kernel instead of its input.
_DENSE_VIEWS = VIEW_OPS - {"expand", "slice", "select", "prims.broadcast_in_dim"}


def _op_key(target: Any) -> str:
    if not isinstance(target, torch._ops.OpOverload):
        return ""
    name = target.overloadpacket.__name__
    return name if target.namespace == "aten" else f"{target.namespace}.{name}"


def _expr(s: Any) -> sympy.Expr | int:
    # Plain ints for static sizes: sympy arithmetic is ~100x slower and graphs are large.
    if isinstance(s, torch.SymInt):
        expr = s.node.expr
        return int(expr) if expr.is_number else expr
    return int(s)


def _numel(shape: Any) -> sympy.Expr | int:
    out: Any = 1
    for s in shape:
        out = out * _expr(s)
    return out if isinstance(out, int) else sympy.expand(out)


def _eq(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return False
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return sympy.expand(a - b) == 0


def _tensors(node: Node) -> list[Any]:
    return [n.meta.get("val") for n in node.all_input_nodes]


def _mutates(node: Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(node.op == "call_function" and schema is not None and schema.is_mutable)


def _signature(node: Node, caps: Any) -> tuple | None:
    """('pw', numel) / ('red', in_shape, dims, out_numel) for fusible nodes, else None."""
    if node.op != "call_function" or _mutates(node):
        return None
    key = _op_key(node.target)
    if key not in caps.fusible_ops:
        return None
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.device.type != caps.device_type:
        return None
    for v in [val, *_tensors(node)]:
        if isinstance(v, torch.Tensor):
            if v.dtype not in caps.dtypes or v.device.type != caps.device_type:
                return None
        elif not isinstance(v, torch.SymInt | int | float | bool | None):
            return None
    if key in _REDUCTIONS:
        if node.target._overloadname not in _REDUCTIONS[key]:
            return None
        src = node.args[0].meta.get("val")
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        nd = src.dim()
        if dims is None or dims == []:
            dims = list(range(nd))
        dims = tuple(sorted({d % max(nd, 1) for d in ([dims] if isinstance(dims, int) else dims)}))
        return ("red", tuple(src.shape), dims, _numel(val.shape))
    if not any(isinstance(v, torch.Tensor) for v in _tensors(node)):
        return None  # creation ops: nothing to fuse with
    # Views only remap indices (any size may join); `cat` materialises a value, so like a
    # compute node it may move the domain to its size (rotate-half: half -> full rows).
    return ("pw", _numel(val.shape), key in VIEW_OPS)


class _Region:
    def __init__(self, rid: int) -> None:
        self.id = rid
        self.nodes: list[Node] = []
        self.full: sympy.Expr | None = None  # numel of the domain
        self.red: tuple | None = None  # (input shape, dims) shared by the reductions
        self.row: sympy.Expr | None = None  # numel of the reduced (row) values

    def domain_after(self, sig: tuple, node: Node) -> tuple | None:
        """(full, red, row) once `node` (signature `sig`) joins, or None if it can't.

        Views/cat of any size may join (they only remap indices; if one ends up needed
        outside, an extern view/copy replaces it). A compute node of another size moves the
        domain to its size (e.g. rotate-half: neg on half rows, then cat to full rows) but
        only while no compute value of the region is used outside the region.
        """
        full, red, row = self.full, self.red, self.row
        if sig[0] == "pw":
            _, n, gather = sig
            if full is None:
                return n, red, row
            if gather or _eq(n, full) or (red is not None and _eq(n, row)):
                return full, red, row
            if red is not None or self.computes_escape(node, n):
                return None
            return n, None, None
        _, shape, dims, out = sig
        if red is not None:
            return (full, red, row) if _same_red(red, (shape, dims)) else None
        n = _numel(shape)
        if full is not None and not _eq(n, full) and self.computes_escape(node, n):
            return None
        return n, (shape, dims), out

    def computes_escape(self, joining: Node, size: Any) -> bool:
        """Whether a computed value of another size than `size` is needed outside.

        Such a value could not be a region output once the domain is `size`; one of that
        size can (e.g. the rotate-half `cat`, whose halves were computed on a half domain).
        A view used outside needs the value it views (through a chain of views) unless
        that is a region input.
        """
        inside = set(self.nodes)
        for m in self.nodes:
            if not any(u not in inside and u is not joining for u in m.users):
                continue
            root = m
            while _op_key(root.target) in VIEW_OPS:
                base = root.args[0] if root.args else None
                if not isinstance(base, Node) or base not in inside:
                    break
                root = base
            if _op_key(root.target) in VIEW_OPS:
                continue  # a view of a region input: recreated outside for free
            if not _eq(_numel(root.meta["val"].shape), size):
                return True
        return False

    def views_only(self) -> bool:
        return all(_op_key(n.target) in VIEW_OPS for n in self.nodes)

    def merged_domain(self, other: _Region) -> tuple | None:
        # Views fit any domain (they only remap indices).
        if other.views_only():
            return self.full, self.red, self.row
        if self.views_only():
            return other.full, other.red, other.row
        a, b = (self, other) if self.red is not None else (other, self)
        if b.red is not None:
            return (a.full, a.red, a.row) if _same_red(a.red, b.red) else None
        if a.red is not None:
            ok = _eq(b.full, a.full) or _eq(b.full, a.row)
            return (a.full, a.red, a.row) if ok else None
        return (a.full, None, None) if _eq(a.full, b.full) else None

    def output_sizes(self) -> tuple[sympy.Expr, ...]:
        """Sizes a region output may have: the domain, and for reductions the row size."""
        if self.red is not None:
            return (self.full, self.row)
        return (self.full,)


def _same_red(x: tuple, y: tuple) -> bool:
    (sa, da), (sb, db) = x, y
    return da == db and len(sa) == len(sb) and all(_eq(_expr(p), _expr(q)) for p, q in zip(sa, sb))


def _split_shared_views(gm: GraphModule, caps: Any) -> None:
    """Each fusible user of a view of a non-fused value gets its own copy of the view chain.

    before:  u = _unsafe_view(mm); q = slice(u, 0:64) ...; k = slice(u, 64:96) ...
    after:   u1 = _unsafe_view(mm); u2 = _unsafe_view(mm); q = slice(u1) ...; k = slice(u2)
    Views cost nothing inside a kernel, but a shared one would put every consumer into
    the region the view starts (q's and k's RoPE, of different sizes, in one region).
    """
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and _signature(node, caps) is not None:
            gm.graph.erase_node(node)  # dead (e.g. the empty pass-through of full RoPE)
            continue
        if len(node.users) < 2 or _op_key(node.target) not in VIEW_OPS:
            continue
        if _signature(node, caps) is None:
            continue
        root = node
        while _op_key(root.target) in VIEW_OPS and root.args and isinstance(root.args[0], Node):
            root = root.args[0]
        if _op_key(root.target) in VIEW_OPS or _signature(root, caps) is not None:
            continue  # views of fused values join the value's region anyway
        fusible = [u for u in node.users if _signature(u, caps) is not None]
        if len(fusible) == len(node.users):
            fusible = fusible[1:]  # the first keeps the original
        for u in fusible:
            with gm.graph.inserting_after(node):
                copy = gm.graph.node_copy(node)
            u.replace_input_with(node, copy)


class _Partitioner:
    def __init__(self, gm: GraphModule, caps: Any) -> None:
        self.gm = gm
        self.caps = caps
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.mutations = [self.order[n] for n in self.nodes if _mutates(n)]
        self.region_of: dict[Node, _Region] = {}
        self.regions: list[_Region] = []

    def placeable(self, members: list[Node]) -> bool:
        lo = min(self.order[n] for n in members)
        hi = max(self.order[n] for n in members)
        if any(lo < m < hi for m in self.mutations):
            return False
        inside = set(members)
        return all(self.order[u] > hi for n in members for u in n.users if u not in inside)

    def run(self) -> list[_Region]:
        for node in self.nodes:
            sig = _signature(node, self.caps)
            if sig is None:
                continue
            cands: list[_Region] = []
            for inp in node.all_input_nodes:
                r = self.region_of.get(inp)
                if r is not None and r not in cands:
                    cands.append(r)
            home: _Region | None = None
            for r in cands:
                if home is None:
                    dom = r.domain_after(sig, node)
                    if dom is not None and self.placeable([*r.nodes, node]):
                        home = r
                        r.full, r.red, r.row = dom
                        r.nodes.append(node)
                        self.region_of[node] = r
                    continue
                dom = home.merged_domain(r)
                if dom is not None and self.placeable(home.nodes + r.nodes):
                    home.full, home.red, home.row = dom
                    home.nodes.extend(r.nodes)
                    for n in r.nodes:
                        self.region_of[n] = home
                    r.nodes = []
            if home is None:
                home = _Region(len(self.regions))
                self.regions.append(home)
                home.full, home.red, home.row = home.domain_after(sig, node)
                home.nodes.append(node)
                self.region_of[node] = home
        return [r for r in self.regions if r.nodes]


def _writes_view(v: Node, inside: set[Node], sizes: tuple) -> bool:
    """Whether the kernel should write the escaping view `v` instead of its input.

    True when `v` (through a chain of element-permuting views) re-arranges a value the
    region computes and that is used nowhere else outside: the kernel writes the same
    elements in `v`'s layout, and the extern view call after the kernel (one per
    RMSNorm -> GEMM in a decode step) disappears. Views of region inputs stay views.
    """
    numel = _numel(v.meta["val"].shape)
    if not any(_eq(numel, z) for z in sizes):
        return False
    node = v
    while _op_key(node.target) in VIEW_OPS:
        base = node.args[0] if node.args else None
        if (
            _op_key(node.target) not in _DENSE_VIEWS
            or not isinstance(base, Node)
            or base not in inside
            or any(u not in inside for u in base.users)
            or not _eq(_numel(base.meta["val"].shape), numel)
        ):
            return False
        node = base
    return True


def _detach_escaping(gm: GraphModule, region: _Region, order: dict[Node, float]) -> None:
    """Values that may not leave the region get an outside copy for their outside users.

    Views (an extern view of a region output is free, materialising it is not; unless the
    view's input is not needed outside, see `_writes_view`) and values whose size is not
    one the loop nest writes (e.g. the halves of a rotary `cat`): the copy is an extern
    ATen op placed before its first user; the region keeps the node only if it still has
    users inside.
    """
    region.nodes.sort(key=order.__getitem__)
    sizes = region.output_sizes()
    changed = True
    while changed:
        changed = False
        inside = set(region.nodes)
        for v in sorted(region.nodes, key=order.__getitem__, reverse=True):
            numel = _numel(v.meta["val"].shape)
            if _op_key(v.target) not in VIEW_OPS and any(_eq(numel, z) for z in sizes):
                continue
            if _writes_view(v, inside, sizes):
                continue
            outside = [u for u in v.users if u not in inside]
            if not outside:
                continue
            # The first outside user in the live graph (earlier copies have no meaningful
            # `order`): users come after `v`, usually shortly after.
            targets = set(outside)
            first = v.next
            while first not in targets and first.op != "root":
                first = first.next
            if first.op == "root":  # (a user before `v`: not expected) graph positions
                pos = {n: i for i, n in enumerate(gm.graph.nodes)}
                first = min(outside, key=pos.__getitem__)
            with gm.graph.inserting_before(first):
                copy = gm.graph.node_copy(v)
            order[copy] = order[first] - 0.5
            for u in outside:
                u.replace_input_with(v, copy)
            if not v.users:
                region.nodes.remove(v)
                gm.graph.erase_node(v)
            changed = True
            break


def _build_module(gm: GraphModule, region: _Region, name: str, order: dict[Node, int]) -> None:
    members = sorted(region.nodes, key=order.__getitem__)
    inside = set(members)
    inputs: list[Node] = []
    for n in members:
        for i in n.all_input_nodes:
            if i not in inside and i not in inputs:
                inputs.append(i)
    outputs = [n for n in members if any(u not in inside for u in n.users)]
    if not outputs:  # dead (pure) code: nothing to run
        for n in reversed(members):
            gm.graph.erase_node(n)
        return
    sub = Graph()
    env: dict[Node, Node] = {}
    for i in inputs:
        env[i] = sub.placeholder(i.name)
        env[i].meta = dict(i.meta)
    for n in members:
        env[n] = sub.node_copy(n, lambda x: env[x])
    sub.output(tuple(env[o] for o in outputs) if len(outputs) > 1 else env[outputs[0]])
    # Lazy: the region's Python code is generated only if the ATen reference ever runs
    # (rendering reads the graph); eager codegen was half of this pass's time.
    gm.add_submodule(name, _LazyGraphModule(gm, sub, class_name=name))
    with gm.graph.inserting_after(members[-1]):
        call = gm.graph.call_module(name, tuple(inputs))
    order[call] = order[members[-1]] + 0.25
    vals = [o.meta.get("val") for o in outputs]
    call.meta["val"] = tuple(vals) if len(outputs) > 1 else vals[0]
    results = [call]
    if len(outputs) > 1:
        results = []
        prev = call
        for k in range(len(outputs)):
            with gm.graph.inserting_after(prev):
                g = gm.graph.call_function(operator.getitem, (call, k))
            g.meta["val"] = vals[k]
            order[g] = order[call] + 0.01 * (k + 1)
            results.append(g)
            prev = g
    for o, r in zip(outputs, results):
        for u in list(o.users):
            if u not in inside:
                u.replace_input_with(o, r)
    for n in reversed(members):
        gm.graph.erase_node(n)


def _custom_impl(target: Any) -> Any:
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(f"{target.namespace}::{target._opname}")
    return getattr(opdef, "_init_fn", None)


def _inline_custom_ops(gm: GraphModule, caps: Any) -> int:
    """Expand custom ops the lowering fuses (e.g. 'yirage.rms_norm') into ATen nodes.

    before:  y = yirage.rms_norm(x, w, 1e-6)
    after:   xf = _to_copy(x); p = pow(xf, 2); m = mean(p, [-1], True); ... y = mul(w, ...)
    The reference implementation is traced on the node's fake values, so the expansion is
    exactly the op's semantics; its pieces then fuse with their neighbours.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    count = 0
    # One trace per distinct (op, argument metadata): the 30 layers of a model share it.
    traces: dict[tuple, Any] = {}
    for node in list(gm.graph.nodes):
        key = _op_key(node.target)
        if node.op != "call_function" or "." not in key or key not in caps.fusible_ops:
            continue
        fn = _custom_impl(node.target)
        if fn is None or node.kwargs:
            continue
        returns = node.target._schema.returns
        if len(returns) > 1 and any(u.target is not operator.getitem for u in node.users):
            continue  # the tuple itself escapes: keep the op
        tensor_pos = [i for i, a in enumerate(node.args) if isinstance(a, Node)]
        fakes = [node.args[i].meta.get("val") for i in tensor_pos]
        if not all(isinstance(f, torch.Tensor) for f in fakes):
            continue
        consts = list(node.args)

        def call(*ts: Any, _consts: list = consts, _pos: list = tensor_pos, _fn: Any = fn) -> Any:
            args = list(_consts)
            for i, t in zip(_pos, ts):
                args[i] = t
            return _fn(*args)

        key = (
            node.target,
            tuple(a if not isinstance(a, Node) else None for a in node.args),
            tuple((str(f.shape), str(f.stride()), f.dtype, f.device) for f in fakes),
        )
        traced = traces.get(key)
        if key not in traces:
            fake_mode = torch._guards.detect_fake_mode(fakes)
            try:
                with fake_mode if fake_mode is not None else _nullcontext(), torch.no_grad():
                    traced = make_fx(call)(*fakes)
            except Exception:  # noqa: BLE001 - keep the op as an extern call
                traced = None
            traces[key] = traced
        if traced is None:
            continue
        literal_sym = any(
            isinstance(a, torch.SymInt | torch.SymFloat)
            for n in traced.graph.nodes
            for a in torch.fx.node.map_aggregate((n.args, n.kwargs), lambda x: x)
            if not isinstance(a, tuple | list | dict)
        ) or any(n.op == "get_attr" for n in traced.graph.nodes)
        if literal_sym:
            continue
        env: dict[Node, Any] = {}
        placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
        for ph, i in zip(placeholders, tensor_pos):
            env[ph] = node.args[i]
        result: Any = None
        with gm.graph.inserting_before(node):
            lookup = env.__getitem__
            for n in traced.graph.nodes:
                if n.op == "call_function":
                    env[n] = gm.graph.node_copy(n, lookup)
                elif n.op == "output":
                    result = torch.fx.node.map_arg(n.args[0], lookup)
        if isinstance(result, list | tuple):
            for u in list(node.users):
                if u.target is operator.getitem:
                    u.replace_all_uses_with(result[u.args[1]])
                    gm.graph.erase_node(u)
        else:
            node.replace_all_uses_with(result)
        # A reference can leave dead nodes behind (prims' var/sum allocate outputs with
        # empty_strided that nothing reads): each would be an allocation per call.
        for n in reversed(
            [env[t] for t in traced.graph.nodes if t in env and t.op != "placeholder"]
        ):
            if not n.users and not _impure(n):
                gm.graph.erase_node(n)
        if not node.users:
            gm.graph.erase_node(node)
            count += 1
    return count


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def fuse_regions(gm: GraphModule, ctx: PassContext) -> int:
    """Partition fusible nodes into regions and outline each as a `call_module`."""
    caps = ctx.capabilities
    if not caps.generates_kernels or not caps.fusible_ops:
        return 0
    _inline_custom_ops(gm, caps)
    _split_shared_views(gm, caps)
    part = _Partitioner(gm, caps)
    regions = part.run()
    order: dict[Node, float] = dict(part.order)
    count = 0
    taken = {name for name, _ in gm.named_children()}
    for region in regions:
        _detach_escaping(gm, region, order)
        if not region.nodes:
            continue
        compute = [n for n in region.nodes if _op_key(n.target) not in VIEW_OPS]
        if not compute:
            continue  # pure data movement: ATen views/copies are as good
        while f"fused_{count}" in taken:
            count += 1
        name = f"fused_{count}"
        taken.add(name)
        _build_module(gm, region, name, order)
        count += 1
    gm.graph.lint()
    return count
