"""Rotary embedding and the static KV-cache write as one Triton kernel.

  rotary_kv_write(q[B, Hq, S, D], k[B, Hkv, S, D], v[B, Hkv, S, D], cos[B|1, (1,) S, D], sin,
                  k_cache[B, Hkv, L, D], v_cache, pos[S], pos_base[1]?) -> q'
      q' = rotary(q); k_cache[:, :, p] = rotary(k); v_cache[:, :, p] = v (in place),
      p = pos + pos_base (HF's `arange + cumulative_length`, one launch fewer) or pos.
  rotary_kv_stage(q, k, v, cos, sin, k_stage[B, Hkv, 1, D], v_stage, stage_pos[1],
                  cache_len, pos[1], pos_base[1]?) -> q'
      The same for one new position (S == 1), staged: the rotated key and the value go
      to the stage buffers instead of the cache, and p to stage_pos; decode_attention
      reads that row from the stage, and a commit copies it into the cache later
      (runtime/cuda_graphs.py: a step started ahead then writes nothing shared).
  kv_commit(k_cache, v_cache, k_stage, v_stage, stage_pos) -> None
      That copy, k_cache[:, :, stage_pos] = k_stage and v's, in one launch.

A decode step of HF's static cache is, per layer, rotary on q, rotary on k, and two
`index_copy_`s into the caches: four launches, each moving a few KB. One program per
(batch, head of q or k, position) does all of it, rotating with `_rotate_row`, the rotary
kernel's own row code (so the cache holds exactly what rotary + index_copy_ would write).
Substituted in the no-Inductor CUDA path only (lowering/cuda_kv_write.py).

Imported only through lowering/triton_kernels.py (Triton at the top: never on a CPU import).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .cuda_kv_stage import AddressTables
from .triton_kernels import _bcast_stride, _rotate_row, _seq_major
from .triton_pool import launch


@triton.jit
def _rotary_kv_write_kernel(
    Q,
    K,
    V,
    C,
    S_,
    QO,
    KC,
    VC,
    POS,
    BASE,
    SPOS,
    HQ,
    HKV,
    S,
    T,
    sqb,
    sqh,
    sqs,
    skb,
    skh,
    sks,
    svb,
    svh,
    svs,
    scb,
    scs,
    ssb,
    sss,
    sob,
    soh,
    sos,
    skcb,
    skch,
    skcs,
    svcb,
    svch,
    svcs,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HAS_BASE: tl.constexpr,
    STAGED: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    s = pid % S
    h = (pid // S) % (HQ + HKV)
    b = pid // (S * (HQ + HKV))
    d = tl.arange(0, BLOCK_HALF)
    m = d < HALF
    if h < HQ:
        x_ptr = Q + b * sqb + h * sqh + s * sqs
        y_ptr = QO + b * sob + h * soh + s * sos
    else:
        j = h - HQ
        p = tl.load(POS + s).to(tl.int64)
        if HAS_BASE:
            p += tl.load(BASE).to(tl.int64)
        # A position outside the cache is not written. ATen's index_copy_ fails a device
        # assert there; with HF's counter-based positions, a CUDA graph replayed past the
        # cache's end (a benchmark timing one step over and over) would otherwise write
        # into whatever memory follows the cache. TRITON_DEBUG=1 turns it into an assert.
        tl.device_assert((p >= 0) & (p < T), "rotary_kv_write: position outside the cache")
        m = m & (p >= 0) & (p < T)
        slot = p
        if STAGED:  # the stage holds one row per (batch, kv head); one program says where
            slot = p * 0
            if (b == 0) & (j == 0):
                tl.store(SPOS, p)
        x_ptr = K + b * skb + j * skh + s * sks
        y_ptr = KC + b * skcb + j * skch + slot * skcs
        # The value row goes to the same slot unchanged.
        v_ptr = V + b * svb + j * svh + s * svs
        w_ptr = VC + b * svcb + j * svch + slot * svcs
        tl.store(w_ptr + d, tl.load(v_ptr + d, mask=m), mask=m)
        tl.store(w_ptr + HALF + d, tl.load(v_ptr + HALF + d, mask=m), mask=m)
    _rotate_row(x_ptr, y_ptr, C + b * scb + s * scs, S_ + b * ssb + s * sss, d, m, HALF)


def _inner(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_dst: torch.Tensor,
    v_dst: torch.Tensor,
    pos: torch.Tensor,
    pos_base: torch.Tensor | None,
    cache_len: int,
    stage_pos: torch.Tensor | None,
) -> torch.Tensor:
    cos, sin = _seq_major(cos), _seq_major(sin)
    q, k, v = _inner(q), _inner(k), _inner(v)
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    out = torch.empty((b, hq, s, d), dtype=q.dtype, device=q.device)
    launch(
        _rotary_kv_write_kernel,
        (b * (hq + hkv) * s,),
        q,
        k,
        v,
        cos,
        sin,
        out,
        k_dst,
        v_dst,
        pos,
        pos if pos_base is None else pos_base,
        pos if stage_pos is None else stage_pos,
        hq,
        hkv,
        s,
        cache_len,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        _bcast_stride(cos, 0),
        cos.stride(1),
        _bcast_stride(sin, 0),
        sin.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        k_dst.stride(0),
        k_dst.stride(1),
        k_dst.stride(2),
        v_dst.stride(0),
        v_dst.stride(1),
        v_dst.stride(2),
        HALF=d // 2,
        BLOCK_HALF=triton.next_power_of_2(d // 2),
        HAS_BASE=pos_base is not None,
        STAGED=stage_pos is not None,
        num_warps=1,
    )
    return out


@triton_op("yirage_cuda::rotary_kv_write", mutates_args=("k_cache", "v_cache"))
def rotary_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
    pos_base: torch.Tensor | None = None,
) -> torch.Tensor:
    return _launch(q, k, v, cos, sin, k_cache, v_cache, pos, pos_base, k_cache.shape[2], None)


@triton_op("yirage_cuda::rotary_kv_stage", mutates_args=("k_stage", "v_stage", "stage_pos"))
def rotary_kv_stage(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_stage: torch.Tensor,
    v_stage: torch.Tensor,
    stage_pos: torch.Tensor,
    cache_len: int,
    pos: torch.Tensor,
    pos_base: torch.Tensor | None = None,
) -> torch.Tensor:
    if q.shape[2] != 1 or k_stage.shape[2] != 1 or v_stage.shape[2] != 1:
        raise ValueError("rotary_kv_stage: one new position (S == 1) and one-row stages")
    return _launch(q, k, v, cos, sin, k_stage, v_stage, pos, pos_base, cache_len, stage_pos)


@triton.jit
def _commit_row(
    KC,
    VC,
    KS,
    VS,
    SPOS,
    pid,
    HKV,
    T,
    skcb,
    skch,
    skcs,
    svcb,
    svch,
    svcs,
    sksb,
    sksh,
    svsb,
    svsh,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = pid // HKV
    h = pid % HKV
    p = tl.load(SPOS).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    m = (d < D) & (p >= 0) & (p < T)  # as rotary_kv_write: nothing past the cache
    k = tl.load(KS + b * sksb + h * sksh + d, mask=m)
    tl.store(KC + b * skcb + h * skch + p * skcs + d, k, mask=m)
    v = tl.load(VS + b * svsb + h * svsh + d, mask=m)
    tl.store(VC + b * svcb + h * svch + p * svcs + d, v, mask=m)


@triton.jit
def _kv_commit_kernel(
    KC,
    VC,
    KS,
    VS,
    SPOS,
    HKV,
    T,
    skcb,
    skch,
    skcs,
    svcb,
    svch,
    svcs,
    sksb,
    sksh,
    svsb,
    svsh,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    _commit_row(
        KC,
        VC,
        KS,
        VS,
        SPOS,
        pid,
        HKV,
        T,
        skcb,
        skch,
        skcs,
        svcb,
        svch,
        svcs,
        sksb,
        sksh,
        svsb,
        svsh,
        D,
        BLOCK_D,
    )


@triton.jit
def _kv_commit_table_kernel(
    TABLE,
    LIKE,
    HKV,
    T,
    skcb,
    skch,
    skcs,
    svcb,
    svch,
    svcs,
    sksb,
    sksh,
    svsb,
    svsh,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Row `program_id(0)` of TABLE: the addresses of its k cache, v cache, k stage,
    v stage (all of LIKE's element type) and stage position (int64)."""
    at = TABLE + tl.program_id(0).to(tl.int64) * 5
    pid = tl.program_id(1).to(tl.int64)
    _commit_row(
        tl.load(at).to(LIKE.dtype),
        tl.load(at + 1).to(LIKE.dtype),
        tl.load(at + 2).to(LIKE.dtype),
        tl.load(at + 3).to(LIKE.dtype),
        tl.load(at + 4).to(tl.pointer_type(tl.int64)),
        pid,
        HKV,
        T,
        skcb,
        skch,
        skcs,
        svcb,
        svch,
        svcs,
        sksb,
        sksh,
        svsb,
        svsh,
        D,
        BLOCK_D,
    )


@triton_op("yirage_cuda::kv_commit", mutates_args=("k_cache", "v_cache"))
def kv_commit(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_stage: torch.Tensor,
    v_stage: torch.Tensor,
    stage_pos: torch.Tensor,
) -> None:
    """k_cache[:, :, stage_pos] = k_stage and the same for v, one launch (two
    `index_copy_`s would be two): a staged step's commit (lowering/cuda_kv_stage.py)."""
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("kv_commit: caches with unit inner stride")
    k_stage, v_stage = _inner(k_stage), _inner(v_stage)
    b, hkv, t, d = k_cache.shape
    launch(
        _kv_commit_kernel,
        (b * hkv,),
        k_cache,
        v_cache,
        k_stage,
        v_stage,
        stage_pos,
        hkv,
        t,
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        k_stage.stride(0),
        k_stage.stride(1),
        v_stage.stride(0),
        v_stage.stride(1),
        D=d,
        BLOCK_D=triton.next_power_of_2(d),
        num_warps=1,
    )


class KvCommitTable:
    """A staged step's rows, every layer's, committed in one launch (`kv_commit` per row
    is a launch per layer: 32 on a 7B step, 0.096 ms of its H100 GPU time). The kernel
    reads each row's five addresses from a device table (lowering/cuda_kv_stage.py
    `AddressTables`: built on the host before the commit's capture, found there by the
    rows' addresses). Called with the rows; False (nothing done) where it cannot."""

    def __init__(self) -> None:
        self.tables = AddressTables()
        self.launches = 0  # one-launch commits run or captured

    def prepare(self, rows: list[tuple[torch.Tensor, ...]]) -> None:
        """Build the rows' table now (outside a capture)."""
        self.tables.get(rows, build=True)

    def __call__(self, rows: list[tuple[torch.Tensor, ...]]) -> bool:
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        table = self.tables.get(rows, build=not capturing)
        if table is None:
            return False
        _launch_table(table, len(rows), *rows[0][:4])
        self.launches += 1
        return True

    @staticmethod
    def record_launch(
        k_cache: torch.Tensor, v_cache: torch.Tensor, k_stage: torch.Tensor, v_stage: torch.Tensor
    ) -> None:
        """The commit's launch for rows of this layout, inside `triton_pool.recording()`
        (precompiling; the caches may be fake: only their layout is read)."""
        table = torch.empty(5, dtype=torch.int64, device=k_stage.device)
        _launch_table(table, 1, k_cache, v_cache, k_stage, v_stage)


def _launch_table(
    table: torch.Tensor,
    n_rows: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_stage: torch.Tensor,
    v_stage: torch.Tensor,
) -> None:
    b, hkv, t, d = k_cache.shape
    launch(
        _kv_commit_table_kernel,
        (n_rows, b * hkv),
        table,
        k_stage,
        hkv,
        t,
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        *k_stage.stride()[:2],
        *v_stage.stride()[:2],
        D=d,
        BLOCK_D=triton.next_power_of_2(d),
        num_warps=1,
        traced=False,
    )
