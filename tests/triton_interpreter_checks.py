"""Our Triton kernels run on the CPU in Triton's interpreter (TRITON_INTERPRET=1), against
the ATen references: a numerics check of kernel code on a machine without a GPU. Run by
tests/test_triton_interpreter.py in a process of its own (the interpreter is chosen when
Triton is imported); exits non-zero on the first mismatch.

Covered: `rotary_kv_write`, its staged form `rotary_kv_stage`, `kv_commit` and its
all-rows form `KvCommitTable`, `decode_attention` with and
without a staged row (cache_position or mask bounds, both merges), and the staging rewrite
(lowering/cuda_kv_stage.py) on a graph of these ops. Float32 only: Triton 3.6's
interpreter does not do bfloat16 faithfully (decode attention in bf16 comes out wrong
there, unstaged too, where it is right on a GPU)."""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import triton.runtime.interpreter as interpreter
from yirage_dynamo.lowering import triton_kernels as kernels
from yirage_dynamo.lowering.cuda_kv_write import rotary_kv_write_reference

import yirage_dynamo.ops  # noqa: F401 - registers the yirage:: references


def _numpy2_safe_index() -> None:
    """Triton 3.6's interpreter turns a one-element tensor into an int with `int(array)`,
    which NumPy 2 refuses for arrays of one dimension (a loop bounded by a loaded value)."""
    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda t: int(np.asarray(t.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def check_rotary_kv_write_and_stage() -> None:
    torch.manual_seed(0)
    b, hq, hkv, d, t = 2, 4, 2, 16, 8
    q, k, v = (torch.randn(b, h, 1, d) for h in (hq, hkv, hkv))
    cos, sin = torch.randn(1, 1, d), torch.randn(1, 1, d)
    kc, vc = torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    pos = torch.tensor([5])
    ref_k, ref_v = kc.clone(), vc.clone()
    ref = rotary_kv_write_reference(q, k, v, cos, sin, ref_k, ref_v, pos)
    got_k, got_v = kc.clone(), vc.clone()
    got = torch.ops.yirage_cuda.rotary_kv_write(q, k, v, cos, sin, got_k, got_v, pos)
    for a, e in ((got, ref), (got_k, ref_k), (got_v, ref_v)):
        torch.testing.assert_close(a, e)
    for p, base in ((pos, None), (torch.tensor([3]), torch.tensor([2]))):
        ks, vs = torch.zeros(b, hkv, 1, d), torch.zeros(b, hkv, 1, d)
        sp = torch.full((1,), -1, dtype=torch.int64)
        before = kc.clone()
        got = torch.ops.yirage_cuda.rotary_kv_stage(q, k, v, cos, sin, ks, vs, sp, t, p, base)
        torch.testing.assert_close(got, ref)
        assert sp.item() == 5, sp
        torch.testing.assert_close(ks[:, :, 0], ref_k[:, :, 5])
        torch.testing.assert_close(vs[:, :, 0], ref_v[:, :, 5])
        assert torch.equal(kc, before)
        committed_k, committed_v = kc.clone(), vc.clone()
        torch.ops.yirage_cuda.kv_commit(committed_k, committed_v, ks, vs, sp)
        torch.testing.assert_close(committed_k, ref_k)
        torch.testing.assert_close(committed_v, ref_v)


def check_kv_commit_table_commits_every_row_as_kv_commit_does() -> None:
    """All layers' rows in one launch (a table of their addresses) write what `kv_commit`
    writes row by row, a position past the cache included; rows of another layout are
    refused (the caller commits them row by row)."""
    torch.manual_seed(0)
    b, hkv, d, t = 2, 2, 16, 8
    rows = []
    for p in (5, 0, t, 7):  # t: past the cache, nothing written
        kc, vc = torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
        rows.append(
            (kc, vc, torch.randn(b, hkv, 1, d), torch.randn(b, hkv, 1, d), torch.tensor([p]))
        )
    ref = [(kc.clone(), vc.clone()) for kc, vc, *_ in rows]
    for (rk, rv), (_, _, ks, vs, sp) in zip(ref, rows):
        torch.ops.yirage_cuda.kv_commit(rk, rv, ks, vs, sp)
    commit = kernels.KvCommitTable()
    for _ in range(2):  # the second call finds its table
        assert commit(rows)
    assert len(commit.tables) == 1 and commit.launches == 2
    for (rk, rv), (kc, vc, *_) in zip(ref, rows):
        assert torch.equal(kc, rk) and torch.equal(vc, rv)
    other = (torch.randn(b, hkv, t, 2 * d), torch.randn(b, hkv, t, 2 * d), *rows[0][2:])
    assert not commit([rows[0], other])


def check_decode_attention_with_and_without_a_stage() -> None:
    torch.manual_seed(0)
    attention = kernels.decode_attention
    cases = [(1, 4, 2, 16, 32, 8, 8, 13, None), (2, 8, 2, 16, 40, 16, 8, 21, torch.bool)]
    cases.append((1, 4, 4, 32, 16, 16, 16, 15, torch.float32))
    for b, hq, hkv, d, t, split, block_n, p, mask_dtype in cases:
        q, kc, vc = torch.randn(b, hq, 1, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
        ks, vs = torch.randn(b, hkv, 1, d), torch.randn(b, hkv, 1, d)
        sp = torch.tensor([p])
        mask, cp = None, sp
        if mask_dtype is not None:
            keep = (torch.arange(t) <= p).view(1, 1, 1, t).expand(b, 1, 1, t)
            mask = keep if mask_dtype is torch.bool else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))  # fmt: skip
            cp = None
        full_k, full_v = kc.clone(), vc.clone()
        full_k[:, :, p], full_v[:, :, p] = ks[:, :, 0], vs[:, :, 0]
        g = hq // hkv
        keys = full_k.repeat_interleave(g, 1)[:, :, : p + 1]
        values = full_v.repeat_interleave(g, 1)[:, :, : p + 1]
        expected = torch.softmax(q @ keys.transpose(-1, -2) * d**-0.5, -1) @ values
        plain = attention(q, full_k, full_v, mask, cp, d**-0.5, split, block_n, 4)
        torch.testing.assert_close(plain, expected, atol=1e-4, rtol=1e-4)
        for sem in (None, torch.zeros(b * hkv, dtype=torch.int32)):
            staged = attention(q, kc, vc, mask, cp, d**-0.5, split, block_n, 4, sem, ks, vs, sp)
            torch.testing.assert_close(staged, plain)


def check_staging_rewrite_with_the_real_ops() -> None:
    """lowering/cuda_kv_stage.py on a graph of the real ops: the staged program's output
    and, after the commit, its caches equal the unstaged graph's."""
    from torch._functorch.aot_autograd import make_boxed_func
    from torch.fx.experimental.proxy_tensor import make_fx
    from yirage_dynamo.lowering import cuda_kv_stage

    ops = torch.ops.yirage_cuda

    def layer(q, k, v, cos, sin, kc, vc, pos, cp):
        q2 = ops.rotary_kv_write(q, k, v, cos, sin, kc, vc, pos)
        return ops.decode_attention(q2, kc, vc, None, cp, 0.25, 8, 8, 4)

    torch.manual_seed(0)
    b, hq, hkv, d, t = 1, 4, 2, 16, 24
    args = [torch.randn(b, h, 1, d) for h in (hq, hkv, hkv)]
    args += [torch.randn(1, 1, d), torch.randn(1, 1, d)]
    args += [torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)]
    args += [torch.tensor([9]), torch.tensor([9])]
    gm = make_fx(layer)(*[a.clone() for a in args])
    # The interpreter runs kernels even under fake tensors: the staged call's value (its
    # output is q's shape) is set here; on a GPU the op's own fake runs (tests/test_cuda_*).
    cuda_kv_stage.set_fake_val = lambda gm, node: node.meta.update(val=node.args[0].meta["val"])
    caches = cuda_kv_stage.stage_kv_writes(
        gm, ops.rotary_kv_write.default, ops.rotary_kv_stage.default, ops.decode_attention.default
    )
    assert caches == [(5, 6)], caches
    table = cuda_kv_stage.StageTable(ops.kv_commit, kernels.KvCommitTable())
    program = cuda_kv_stage.StagedProgram(make_boxed_func(gm.forward), caches, table)
    ref_args, got_args = [a.clone() for a in args], [a.clone() for a in args]
    ref = layer(*ref_args)
    got = program(got_args)
    torch.testing.assert_close(got, ref)
    assert torch.equal(got_args[5], args[5]), "the cache was written before the commit"
    table.commit()
    torch.testing.assert_close(got_args[5], ref_args[5])
    torch.testing.assert_close(got_args[6], ref_args[6])


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (set before Triton is imported)")
    _numpy2_safe_index()
    check_rotary_kv_write_and_stage()
    check_kv_commit_table_commits_every_row_as_kv_commit_does()
    check_decode_attention_with_and_without_a_stage()
    check_staging_rewrite_with_the_real_ops()
    print("interpreter checks passed", file=sys.stderr)
