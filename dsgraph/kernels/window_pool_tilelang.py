"""TileLang (Hopper, sm_90a) kernels for ``dsgraph::window_pool``, forward and backward.

Semantics: ``dsgraph/ops/window_pool.py``; oracle: ``dsgraph/kernels/window_pool_ref.py``.

SIMT layout: a CTA of ``THREADS`` threads owns THREADS consecutive output features of a run of
windows of one batch row; thread t owns feature column t, so a warp's loads of one token are 32
consecutive elements (coalesced), and every element of kv / score is read by exactly one thread
once (in overlap mode the previous window's first half is read by the window after it only). Per
window the thread keeps the slots' kv and score + ape in a local array and runs an online softmax
over them (fp32; a column whose slots are all -inf ends 0 / 0 = NaN, as eager's softmax).

Backward: the same walk recomputes the softmax, writes dkv = g·p and dscore = g·p·(kv - pooled), and
adds dscore into a shared [slots, THREADS] fp32 column per thread (no thread reads another's
column, so no barrier); each CTA writes its column sums as one partial of dape, which torch sums.
The shared accumulator bounds the slots: ``MAX_SLOTS`` (ratio 128 plain, 64 overlapping).
``tilelang`` is imported lazily: importing this module never fails.
"""
# No `from __future__ import annotations`: TileLang evaluates the prim_funcs' annotations.
import functools
from typing import Optional

import torch

from .common import tilelang_device_reason

TARGET = {"kind": "cuda", "arch": "sm_90a"}
_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
THREADS = 128
MAX_SLOTS = 128  # 64 KB of shared dape accumulators per CTA
_FWD_WINDOWS = 2  # windows per CTA in the forward
_BWD_CTAS_PER_SM = 8


def tilelang_unsupported_reason(kv, score, ape, ratio: int, overlap: bool) -> Optional[str]:
    reason = tilelang_device_reason((kv, score, ape), "tilelang window-pool kernels")
    if reason is not None:
        return reason
    for name, t in (("kv", kv), ("score", score), ("ape", ape)):
        if t is not None and t.dtype not in _DTYPES:
            return f"{name} dtype {t.dtype} not supported (fp16, bf16, fp32)"
    slots = 2 * ratio if overlap else ratio
    if slots > MAX_SLOTS:
        return f"{slots} slots per window > {MAX_SLOTS} (the backward's shared dape accumulator)"
    if kv.numel() >= 2 ** 31:
        return "kv has >= 2^31 elements (int32 offsets)"
    return None


def _slot(T, n, j, ratio: int, overlap: bool, half: int):
    """Token and column offset of slot j of window n: overlap slots < ratio are window n - 1's first half."""
    if overlap:
        prev = j < ratio
        return T.if_then_else(prev, (n - 1) * ratio + j, n * ratio + j - ratio), T.if_then_else(prev, 0, half)
    return n * ratio + j, 0


def _program(ratio: int, overlap: bool, width: int, kv_t: str, s_t: str, out_t: str, backward: bool):
    import tilelang.language as T

    batch, tokens, windows, parts = T.dynamic("B"), T.dynamic("N"), T.dynamic("P"), T.dynamic("C")
    half = width // 2 if overlap else width  # output features
    slots = 2 * ratio if overlap else ratio
    first = ratio if overlap else 0  # window 0 has no slots below this
    f32 = "float32"
    ninf = -T.infinity(f32)
    walk = T.unroll if slots <= 16 else T.serial  # a few slots: registers

    @T.macro
    def softmax_pass(KV, S, APE, b, n, col, k, s, m, den, num):
        """Loads window n's slots at column col into k / s and runs the online softmax."""
        m[0] = ninf
        den[0] = T.float32(0)
        num[0] = T.float32(0)
        for j in walk(slots):
            if (j >= first) | (n > 0):
                tok, off = _slot(T, n, j, ratio, overlap, half)
                k[j] = T.cast(KV[b, tok, col + off], f32)
                s[j] = T.cast(S[b, tok, col + off], f32) + APE[j % ratio, col + off]
                top = T.max(m[0], s[j])
                # nothing finite yet: keep the sums at 0 (exp(-inf - -inf) would be NaN)
                alpha = T.if_then_else(top == ninf, T.float32(1), T.exp(m[0] - top))
                e = T.if_then_else(top == ninf, T.float32(0), T.exp(s[j] - top))
                den[0] = den[0] * alpha + e
                num[0] = num[0] * alpha + e * k[j]
                m[0] = top

    if not backward:
        @T.prim_func
        def fwd(KV: T.Tensor((batch, tokens, width), kv_t), S: T.Tensor((batch, tokens, width), s_t),
                APE: T.Tensor((ratio, width), f32), Out: T.Tensor((batch, windows, half), out_t)):
            with T.Kernel(T.ceildiv(windows, _FWD_WINDOWS), T.ceildiv(half, THREADS), batch,
                          threads=THREADS) as (bx, by, b):
                tx = T.get_thread_binding()
                k = T.alloc_local((slots,), f32)
                s = T.alloc_local((slots,), f32)
                m = T.alloc_local((1,), f32)
                den = T.alloc_local((1,), f32)
                num = T.alloc_local((1,), f32)
                col = by * THREADS + tx
                for i in T.serial(_FWD_WINDOWS):
                    n = bx * _FWD_WINDOWS + i
                    if n < windows and col < half:
                        softmax_pass(KV, S, APE, b, n, col, k, s, m, den, num)
                        Out[b, n, col] = T.cast(num[0] / den[0], out_t)
        return fwd

    @T.prim_func
    def bwd(KV: T.Tensor((batch, tokens, width), kv_t), S: T.Tensor((batch, tokens, width), s_t),
            APE: T.Tensor((ratio, width), f32), G: T.Tensor((batch, windows, half), out_t),
            DKV: T.Tensor((batch, tokens, width), kv_t), DS: T.Tensor((batch, tokens, width), s_t),
            Parts: T.Tensor((parts, ratio, width), f32), per_cta: T.int32):
        with T.Kernel(T.ceildiv(windows, per_cta), T.ceildiv(half, THREADS), batch,
                      threads=THREADS) as (bx, by, b):
            tx = T.get_thread_binding()
            acc = T.alloc_shared((slots, THREADS), f32)
            k = T.alloc_local((slots,), f32)
            s = T.alloc_local((slots,), f32)
            m = T.alloc_local((1,), f32)
            den = T.alloc_local((1,), f32)
            num = T.alloc_local((1,), f32)
            col = by * THREADS + tx
            for j in T.serial(slots):
                acc[j, tx] = T.float32(0)
            for i in T.serial(per_cta):
                n = bx * per_cta + i
                if n < windows and col < half:
                    softmax_pass(KV, S, APE, b, n, col, k, s, m, den, num)
                    pooled = num[0] / den[0]
                    g = T.cast(G[b, n, col], f32)
                    for j in walk(slots):
                        if (j >= first) | (n > 0):
                            tok, off = _slot(T, n, j, ratio, overlap, half)
                            p = T.exp(s[j] - m[0]) / den[0] * g
                            DKV[b, tok, col + off] = T.cast(p, kv_t)
                            d = p * (k[j] - pooled)
                            DS[b, tok, col + off] = T.cast(d, s_t)
                            acc[j, tx] = acc[j, tx] + d
            if col < half:
                for j in T.serial(slots):
                    if overlap:
                        Parts[b * T.ceildiv(windows, per_cta) + bx, j % ratio,
                              col + T.if_then_else(j < ratio, 0, half)] = acc[j, tx]
                    else:
                        Parts[b * T.ceildiv(windows, per_cta) + bx, j, col] = acc[j, tx]
    return bwd


@functools.lru_cache(maxsize=None)
def _kernel(ratio: int, overlap: bool, width: int, kv_t: str, s_t: str, out_t: str, backward: bool):
    import tilelang
    return tilelang.compile(_program(ratio, overlap, width, kv_t, s_t, out_t, backward), target=TARGET)


def compile_for_sm90a(ratio: int = 4, overlap: bool = True, width: int = 1024, dtype: torch.dtype = torch.bfloat16,
                      out_dtype: torch.dtype = torch.float32) -> dict:
    """Build (or fetch from the cache) the forward and backward kernels of one config for sm_90a;
    nvcc runs, no GPU is needed. Returns the compiled kernels by name."""
    args = (ratio, overlap, width, _DTYPES[dtype], _DTYPES[dtype], _DTYPES[out_dtype])
    return {"forward": _kernel(*args, False), "backward": _kernel(*args, True)}


def _prepare(kv, score, ape, ratio, overlap):
    from ..ops.window_pool import check_window_pool_args
    check_window_pool_args(kv, score, ape, ratio, overlap)
    reason = tilelang_unsupported_reason(kv, score, ape, ratio, overlap)
    if reason is not None:
        raise ValueError(f"the tilelang window-pool kernels cannot serve this call: {reason}")
    w = kv.shape[-1]
    ape32 = torch.zeros(ratio, w, device=kv.device) if ape is None else ape.float().contiguous()
    return kv.contiguous(), score.contiguous(), ape32


def window_pool_tilelang(kv, score, ape, ratio: int, overlap: bool, out_dtype: torch.dtype) -> torch.Tensor:
    kv, score, ape32 = _prepare(kv, score, ape, ratio, overlap)
    B, N, w = kv.shape
    out = torch.empty(B, N // ratio, w // 2 if overlap else w, dtype=out_dtype, device=kv.device)
    if out.numel():
        _kernel(ratio, overlap, w, _DTYPES[kv.dtype], _DTYPES[score.dtype], _DTYPES[out_dtype], False)(
            kv, score, ape32, out)
    return out


def window_pool_tilelang_backward(kv, score, ape, grad, ratio: int, overlap: bool):
    kv, score, ape32 = _prepare(kv, score, ape, ratio, overlap)
    B, N, w = kv.shape
    P, D = N // ratio, w // 2 if overlap else w
    # Unread positions (tokens past P·r; in overlap mode the last window's first half) stay zero.
    dkv, ds = torch.zeros_like(kv), torch.zeros_like(score)
    grad = grad if grad.dtype in _DTYPES else grad.float()
    sms = torch.cuda.get_device_properties(kv.device).multi_processor_count
    ctas_per_row = max(1, _BWD_CTAS_PER_SM * sms // (-(-D // THREADS) * B))  # each writes one dape partial
    per_cta = max(1, -(-P // ctas_per_row))
    ctas = -(-P // per_cta)
    parts = torch.zeros(B * ctas, ratio, w, dtype=torch.float32, device=kv.device)
    if P:
        _kernel(ratio, overlap, w, _DTYPES[kv.dtype], _DTYPES[score.dtype], _DTYPES[grad.dtype], True)(
            kv, score, ape32, grad.contiguous(), dkv, ds, parts, per_cta)
    dape = parts.sum(0)
    return dkv, ds, dape if ape is None else dape.to(ape.dtype)
