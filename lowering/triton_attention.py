"""Decode attention as a `torch.library.triton_op` (`yirage_cuda::decode_attention`):
flash-decoding over the valid prefix of a static KV cache. Imported by
lowering/triton_kernels.py (whose docstring lists the op's contract), never at package
import: it imports Triton.

One program per (batch, kv head, `split`-long chunk of the cache) handles every query head
of its GQA group; the chunks' partial results are merged by their log-sum-exp, by a second
kernel or, given a call site's zeroed counters (`merge_sem`), by the last chunk program to
finish. That one-launch form measured slower on an H100 (RESULTS.md, eighteenth session):
the last program's serial merge outlasts the launch it saves. The config search only tries
it under YIRAGE_CUDA_ATTN_MERGE=search.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .triton_pool import launch


@triton.jit
def _decode_attn_split_kernel(
    Q,
    K,
    V,
    CP,
    MASK,
    MO,
    MLSE,
    OUT,
    KS,
    VS,
    SPOS,
    n_cp,
    T,
    scale,
    G,
    HKV,
    NUM_SPLITS,
    sob,
    soh,
    sqb,
    sqh,
    skb,
    skh,
    skn,
    svb,
    svh,
    svn,
    smb,
    smn,
    sksb,
    sksh,
    svsb,
    svsh,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_CP: tl.constexpr,
    IEEE: tl.constexpr,
    DIRECT: tl.constexpr,
    TRIGGER: tl.constexpr,
    SEM,
    BLOCK_S: tl.constexpr,
    MERGE_LAST: tl.constexpr,
    STAGED: tl.constexpr,
):
    # DIRECT: one split covers the cache, so this program writes the final output and
    # no merge kernel runs. MERGE_LAST: the last of a (batch, kv head)'s split programs to
    # finish merges their partial results (counted in SEM[bh], left at 0 for the next
    # launch), so no merge kernel runs either.
    if TRIGGER:  # see _pdl_trigger
        tl.extra.cuda.gdc_launch_dependents()
    bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    if HAS_CP:
        # Valid prefix, read on the device: CUDA-graph replays see each step's value.
        # Clamped to the cache: a position past its end must not read past it.
        valid = tl.minimum(tl.load(CP + n_cp - 1).to(tl.int32) + 1, T)
    else:
        valid = T
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, valid)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gm = g < G
    dm = d < D
    q = tl.load(
        Q + b * sqb + (hk * G + g)[:, None] * sqh + d[None, :],
        mask=gm[:, None] & dm[None, :],
        other=0.0,
    )
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    if STAGED:  # the row at SPOS comes from the stage (triton_kv_write.rotary_kv_stage)
        sp = tl.load(SPOS)
        k_new = tl.load(KS + b * sksb + hk * sksh + d, mask=dm, other=0.0)
        v_new = tl.load(VS + b * svsb + hk * svsh + d, mask=dm, other=0.0)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nm = n < end
        live = nm
        if MASK_KIND == 1:
            keep = tl.load(MASK + b * smb + n * smn, mask=nm, other=0)
            live = nm & (keep != 0)
        elif MASK_KIND == 2:
            madd = tl.load(MASK + b * smb + n * smn, mask=nm, other=float("-inf"))
            madd = madd.to(tl.float32)
            # An additive mask at <= -1e30 (-inf or finfo.min) gives exp() == 0 exactly.
            live = nm & (madd > -1e30)
        # Blocks the mask hides entirely (the unwritten tail of a static cache) are
        # skipped after reading only the mask: no K/V traffic for them.
        if tl.max(live.to(tl.int32), 0) > 0:
            kv_mask = nm[:, None] & dm[None, :]
            k = tl.load(k_base + n[:, None] * skn + d[None, :], mask=kv_mask, other=0.0)
            if STAGED:
                k = tl.where((n == sp)[:, None], k_new[None, :], k)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * scale
            if MASK_KIND == 2:
                s = tl.where(nm[None, :], s + madd[None, :], float("-inf"))
            else:
                s = tl.where(live[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row whose keys are all masked so far keeps m at -inf: subtract 0 (no NaN).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + n[:, None] * svn + d[None, :], mask=kv_mask, other=0.0)
            if STAGED:
                v = tl.where((n == sp)[:, None], v_new[None, :], v)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if DIRECT:
        tl.store(
            OUT + b * sob + (hk * G + g)[:, None] * soh + d[None, :],
            out.to(OUT.dtype.element_ty),
            mask=gm[:, None] & dm[None, :],
        )
    else:
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        row = b * (HKV * G) + hk * G + g  # flat (batch, query head)
        tl.store(
            MO + (row * NUM_SPLITS + split)[:, None] * BLOCK_D + d[None, :],
            out,
            mask=gm[:, None],
        )
        tl.store(MLSE + row * NUM_SPLITS + split, lse, mask=gm)
        if MERGE_LAST:
            # Every thread's stores are issued before the release below (the pattern of
            # a split-K semaphore: barrier, then one gpu-scope acq_rel atomic).
            tl.debug_barrier()
            done = tl.atomic_add(SEM + bh, 1, sem="acq_rel", scope="gpu")
            if done == NUM_SPLITS - 1:
                _merge_rows(MO, MLSE, OUT, b * (HKV * G) + hk * G, b, hk * G, G, NUM_SPLITS, sob, soh, D, BLOCK_D, BLOCK_S)  # fmt: skip
                tl.atomic_xchg(SEM + bh, 0, sem="relaxed", scope="gpu")


@triton.jit
def _merge_rows(MO, MLSE, OUT, row0, b, h0, n_rows, NUM_SPLITS, sob, soh, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    """out[b, h0 + i] for i < n_rows: the splits' partial outputs weighted by their
    log-sum-exp. Partials written by other programs are read past L1 (`.cg`)."""
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    sm = s < NUM_SPLITS
    for i in range(0, n_rows):
        row = row0 + i
        lse = tl.load(
            MLSE + row * NUM_SPLITS + s, mask=sm, other=float("-inf"), cache_modifier=".cg"
        )
        m = tl.max(lse, 0)
        w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - m))
        o = tl.load(
            MO + (row * NUM_SPLITS + s)[:, None] * BLOCK_D + d[None, :],
            mask=sm[:, None],
            other=0.0,
            cache_modifier=".cg",
        )
        out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
        tl.store(OUT + b * sob + (h0 + i) * soh + d, out.to(OUT.dtype.element_ty), mask=d < D)


@triton.jit
def _decode_attn_merge_kernel(
    MO,
    MLSE,
    OUT,
    HQ,
    NUM_SPLITS,
    sob,
    soh,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    TRIGGER: tl.constexpr,
):
    if TRIGGER:  # see _pdl_trigger
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    _merge_rows(MO, MLSE, OUT, row, row // HQ, row % HQ, 1, NUM_SPLITS, sob, soh, D, BLOCK_D, BLOCK_S)  # fmt: skip


def _pdl_trigger() -> bool:
    """Whether the attention kernels let the next kernel launch at once (PDL's
    `launch_dependents`): with YIRAGE_CUDA_PDL on, the o-projection GEMV after them is a
    programmatic dependent launch that streams its weights while attention runs, and
    waits for attention's output before it reads it. A scheduling hint only: results
    are the same either way. Read when the op is traced (compile time)."""
    from .cuda_pdl import pdl_mode

    return pdl_mode() != "off"


def _mask_rows(mask: torch.Tensor | None, b: int) -> tuple[int, int, int]:
    """(kind, batch stride, key stride) of a [B|1, 1, 1, T] mask (or no mask)."""
    if mask is None:
        return 0, 0, 0
    kind = 1 if mask.dtype == torch.bool else 2
    return kind, 0 if mask.shape[0] == 1 else mask.stride(0), mask.stride(-1)


@triton_op("yirage_cuda::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    attn_mask: torch.Tensor | None,
    cache_position: torch.Tensor | None,
    scale: float,
    split: int,
    block_n: int,
    num_warps: int,
    merge_sem: torch.Tensor | None = None,
    k_stage: torch.Tensor | None = None,
    v_stage: torch.Tensor | None = None,
    stage_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """`merge_sem`: int32 zeros, one per (batch, kv head), owned by this call site. Given
    (and the cache in more than one split), the last split program of each (batch, kv
    head) merges the partial results, instead of a second kernel; it leaves them zero.
    `k_stage`, `v_stage` ([B, Hkv, 1, D]) and `stage_pos` ([1]): the cache's row at
    stage_pos is read from them instead (a staged write, not yet committed)."""
    b, hq, _, d = q.shape
    hkv, max_len = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    num_splits = triton.cdiv(max_len, split)
    direct = num_splits == 1
    block_d = triton.next_power_of_2(d)
    # [B, Hq, 1, D] with a [B, 1, Hq, D] layout, like yirage::attention's (SDPA's) output.
    out = torch.empty((b, 1, hq, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    if direct:  # the split kernel writes `out`; the partial-result buffers are not read
        mid_o = mid_lse = out
    else:
        mid_o = torch.empty((b * hq, num_splits, block_d), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((b * hq, num_splits), dtype=torch.float32, device=q.device)
    mask_kind, smb, smn = _mask_rows(attn_mask, b)
    trigger = _pdl_trigger()
    merge_last = merge_sem is not None and not direct
    if merge_last and (merge_sem.dtype != torch.int32 or merge_sem.numel() < b * hkv):
        raise ValueError(f"merge_sem: expected >= {b * hkv} int32 counters")
    block_s = max(2, triton.next_power_of_2(num_splits))
    staged = stage_pos is not None
    if staged and (k_stage is None or v_stage is None):
        raise ValueError("decode_attention: stage_pos needs k_stage and v_stage")
    ks, vs = (k_stage, v_stage) if staged else (q, q)
    launch(
        _decode_attn_split_kernel,
        (b * hkv, num_splits),
        q,
        k_cache,
        v_cache,
        cache_position if cache_position is not None else q,
        attn_mask if attn_mask is not None else q,
        mid_o,
        mid_lse,
        out,
        ks,
        vs,
        stage_pos if staged else q,
        cache_position.shape[0] if cache_position is not None else 0,
        max_len,
        scale,
        group,
        hkv,
        num_splits,
        out.stride(0),
        out.stride(1),
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        smb,
        smn,
        ks.stride(0) if staged else 0,
        ks.stride(1) if staged else 0,
        vs.stride(0) if staged else 0,
        vs.stride(1) if staged else 0,
        D=d,
        BLOCK_D=block_d,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        SPLIT=split,
        MASK_KIND=mask_kind,
        HAS_CP=cache_position is not None,
        IEEE=q.dtype == torch.float32,
        DIRECT=direct,
        TRIGGER=trigger,
        SEM=merge_sem if merge_last else q,
        BLOCK_S=block_s,
        MERGE_LAST=merge_last,
        STAGED=staged,
        num_warps=num_warps,
    )
    if direct or merge_last:
        return out
    launch(
        _decode_attn_merge_kernel,
        (b * hq,),
        mid_o,
        mid_lse,
        out,
        hq,
        num_splits,
        out.stride(0),
        out.stride(1),
        D=d,
        BLOCK_D=block_d,
        BLOCK_S=block_s,
        TRIGGER=trigger,
        num_warps=4,
    )
    return out
