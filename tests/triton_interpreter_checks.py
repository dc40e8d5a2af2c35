"""Our Triton kernels run on the CPU in Triton's interpreter (TRITON_INTERPRET=1), against
the ATen references: a numerics check of kernel code on a machine without a GPU. Run by
tests/test_triton_interpreter.py in a process of its own (the interpreter is chosen when
Triton is imported); exits non-zero on the first mismatch.

Covered: `rotary_kv_write`, its staged form `rotary_kv_stage`, and `decode_attention` with
and without a staged row (cache_position or mask bounds, both merges)."""

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


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (set before Triton is imported)")
    _numpy2_safe_index()
    check_rotary_kv_write_and_stage()
    check_decode_attention_with_and_without_a_stage()
    print("interpreter checks passed", file=sys.stderr)
