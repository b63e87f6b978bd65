"""TileLang (Hopper, sm_90a) kernels for ``dsgraph::indexer_scores`` / ``dsgraph::indexer_topk``.

Semantics: ``dsgraph/ops/indexer.py``; oracle: ``dsgraph/kernels/indexer_ref.py``.

Scores kernel (one CTA per ``block_q`` queries of one batch): the queries' q rows
[block_q * H, D] stay in shared memory; key tiles [block_n, D] of the band are streamed
(``T.Pipelined``), ``k_tile @ q^T`` runs on wgmma into an fp32 [block_n, block_q * H] fragment,
then relu, * weights and the head sum happen in registers, so [B, S, H, T] never exists. Key tiles
wholly outside the band are skipped (the full-scores kernel writes -inf there without any math).
block_q = 256 // H keeps the gemm N at 256 (the DeepSeek V3.2 indexer has H = 64: 4 queries).

Top-k (two stages, per chunk of queries):
1. the scores kernel writes the chunk's band tiles into an fp32 buffer [B, rows, T], rows chosen
   so that the buffer stays under ``chunk_bytes`` (default 256 MiB): memory is B * rows * T * 4
   bytes plus the outputs, never [B, S, T];
2. a selector kernel, one CTA per query row, reads only the row's band [lo, hi): a 4 x 8-bit radix
   select on order-preserving uint32 keys finds the K-th largest key exactly (a 257-int histogram
   in shared memory per pass), one more pass gathers the K winners into shared memory (ties at
   the threshold taken in atomic order), a bitonic sort orders them (value descending, then index
   ascending), and the slots the band cannot fill get -inf with the first out-of-band indices.
   Cost: 5 reads of the row's band per query, shared memory 8 * next_pow2(K) bytes + 1 KB.
NaN scores are not supported (they sort as if they were keys of their bit pattern).

Backward: none here; the registration uses the Triton backward (see the report / ops/indexer.py).
"""
# No `from __future__ import annotations`: TileLang evaluates the prim_funcs' annotations, which
# name the builders' local dynamic shapes.
import functools
from typing import Optional

import torch

from .common import tilelang_device_reason

TARGET = {"kind": "cuda", "arch": "sm_90a"}
_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
_HEAD_DIMS = (64, 128)
_HEADS = (16, 32, 64, 128)
_MAX_TOPK = 8192  # the sort buffer is 8 * next_pow2(K) bytes of shared memory
_BIG = 1 << 30  # an unbounded band side; keeps the band arithmetic in int32
_SELECT_THREADS = 512
_CHUNK_BYTES = 256 << 20


def _scores_config(heads: int) -> dict:
    """block_q queries per CTA (gemm N = block_q * H = 256), block_n keys per tile. On an H100 at
    H=64, D=128, S=T=16k this beat N=128 (2 queries) by 1-6% and block_n=64 or 3 stages."""
    return dict(block_q=max(1, 256 // heads), block_n=128, threads=256, stages=2)


@functools.lru_cache(maxsize=None)
def _scores_kernel(heads: int, dim: int, dtype: str, has_bias: bool, fill_outside: bool):
    """Compiled scores kernel. Lengths are dynamic (one build serves every B, S, T, chunk);
    ``fill_outside``: write -inf to the key tiles outside the band (the full scores op), or leave
    them untouched (the top-k buffer, whose selector reads the band only)."""
    import tilelang
    import tilelang.language as T

    cfg = _scores_config(heads)
    block_q, block_n = cfg["block_q"], cfg["block_n"]
    rows_q = block_q * heads
    acc_t = "float32"
    batch, seq, seq_heads, keys, rows = (T.dynamic(n) for n in ("B", "S", "SH", "T", "R"))
    bias_b, bias_s = T.dynamic("BB"), T.dynamic("BS")

    @T.prim_func
    def scores(Q: T.Tensor((batch, seq_heads, dim), dtype),  # q viewed as [B, S * H, D]
               K: T.Tensor((batch, keys, dim), dtype),
               W: T.Tensor((batch, seq, heads), acc_t),
               Bias: T.Tensor((bias_b, bias_s, keys), acc_t),  # BB in {1, B}, BS in {1, S}
               Out: T.Tensor((batch, rows, keys), acc_t),  # query rows s_begin + [0, R)
               s_begin: T.int32, lower: T.int32, upper: T.int32):
        with T.Kernel(T.ceildiv(rows, block_q), batch, threads=cfg["threads"]) as (bx, b):
            q_s = T.alloc_shared((rows_q, dim), dtype)
            k_s = T.alloc_shared((block_n, dim), dtype)
            acc = T.alloc_fragment((block_n, rows_q), acc_t)
            acc3 = T.reshape(acc, (block_n, block_q, heads))
            logits = T.alloc_fragment((block_n, block_q), acc_t)
            w = T.alloc_fragment((block_q, heads), acc_t)

            row0 = bx * block_q
            s0 = s_begin + row0
            T.copy(Q[b, s0 * heads, 0], q_s)
            T.copy(W[b, s0, 0], w)

            # Key tiles [tile_lo, tile_hi) meet the band of queries s0 .. s_last.
            n_tiles = T.ceildiv(keys, block_n)
            s_last = s_begin + T.min(row0 + block_q, rows) - 1
            tile_lo = T.min(T.max(s0 + lower, 0) // block_n, n_tiles)
            tile_hi = T.max(T.ceildiv(T.max(T.min(s_last + upper + 1, keys), 0), block_n), tile_lo)

            if fill_outside:
                for i in T.serial(n_tiles - (tile_hi - tile_lo)):
                    tile = T.if_then_else(i < tile_lo, i, i + tile_hi - tile_lo)
                    for r, c in T.Parallel(block_q, block_n):
                        if row0 + r < rows and tile * block_n + c < keys:
                            Out[b, row0 + r, tile * block_n + c] = -T.infinity(acc_t)

            for i in T.Pipelined(tile_hi - tile_lo, num_stages=cfg["stages"]):
                t0 = (tile_lo + i) * block_n
                T.copy(K[b, t0, 0], k_s)
                T.gemm(k_s, q_s, acc, transpose_B=True, clear_accum=True, policy=T.GemmWarpPolicy.FullCol)
                for n, j, h in T.Parallel(block_n, block_q, heads):
                    acc3[n, j, h] = T.max(acc3[n, j, h], 0) * w[j, h]
                T.reduce_sum(acc3, logits, dim=-1)
                for j, n in T.Parallel(block_q, block_n):
                    if row0 + j < rows and t0 + n < keys:
                        rel = t0 + n - (s0 + j)
                        value = logits[n, j]
                        if has_bias:
                            value = value + Bias[T.min(b, bias_b - 1), T.min(s0 + j, bias_s - 1), t0 + n]
                        Out[b, row0 + j, t0 + n] = T.if_then_else(
                            (rel >= lower) & (rel <= upper), value, -T.infinity(acc_t))

    return tilelang.compile(scores, target=TARGET)


def _to_key(T, x):
    """fp32 -> uint32 whose unsigned order is the float order (negative: flip all bits;
    non-negative: flip the sign bit)."""
    bits = T.reinterpret(x, "uint32")
    return T.if_then_else(bits >> 31 == T.uint32(1), ~bits, bits | T.uint32(0x80000000))


def _from_key(T, key):
    bits = T.if_then_else(key >> 31 == T.uint32(1), key & T.uint32(0x7FFFFFFF), ~key)
    return T.reinterpret(bits, "float32")


@functools.lru_cache(maxsize=None)
def _select_kernel(topk: int):
    """Compiled top-k selector for the rows of one scores chunk (see the module docstring)."""
    import tilelang
    import tilelang.language as T

    threads, radix = _SELECT_THREADS, 256
    size = 1 << max(0, topk - 1).bit_length()  # the bitonic sort's power-of-two length
    log_size = size.bit_length() - 1
    batch, seq, keys, rows = (T.dynamic(n) for n in ("B", "S", "T", "R"))

    @T.prim_func
    def select(Scores: T.Tensor((batch, rows, keys), "float32"),
               Values: T.Tensor((batch, seq, topk), "float32"),
               Indices: T.Tensor((batch, seq, topk), "int64"),
               s_begin: T.int32, lower: T.int32, upper: T.int32):
        with T.Kernel(rows, batch, threads=threads) as (row, b):
            tx = T.get_thread_binding()
            hist = T.alloc_shared((radix + 1,), "int32")  # suffix counts; hist[radix] stays 0
            found = T.alloc_shared((1,), "int32")
            counts = T.alloc_shared((2,), "int32")
            cand_key = T.alloc_shared((size,), "uint32")
            cand_idx = T.alloc_shared((size,), "int32")
            prefix = T.alloc_var("uint32")  # the K-th largest key, 8 bits per pass
            need = T.alloc_var("int32")  # how many keys equal to the prefix still to take
            scan = T.alloc_var("int32")
            key = T.alloc_var("uint32")
            pos = T.alloc_var("int32")
            other = T.alloc_var("int32")
            swap_key = T.alloc_var("uint32")
            swap_idx = T.alloc_var("int32")

            s = s_begin + row
            lo = T.max(s + lower, 0)
            hi = T.max(T.min(s + upper + 1, keys), lo)
            take = T.min(hi - lo, topk)  # winners inside the band; the rest are -inf fillers
            prefix = T.uint32(0)
            need = take

            for p in T.serial(T.if_then_else(take > 0, 4, 0)):
                shift = 24 - 8 * p
                for i in T.serial(T.ceildiv(radix + 1, threads)):
                    if i * threads + tx <= radix:
                        hist[i * threads + tx] = 0
                T.sync_threads()
                for i in T.serial(T.ceildiv(hi - lo, threads)):
                    if lo + i * threads + tx < hi:
                        key = _to_key(T, Scores[b, row, lo + i * threads + tx])
                        # Only keys whose higher bits equal the prefix found so far take part.
                        if T.shift_right(T.cast(key ^ prefix, "uint64"), T.cast(shift + 8, "uint64")) == T.uint64(0):
                            T.atomic_add(hist[T.cast((key >> T.cast(shift, "uint32")) & T.uint32(0xFF), "int32")], 1)
                T.sync_threads()
                for step in T.serial(8):  # Hillis-Steele suffix sum: hist[d] = count of bins >= d
                    if tx < radix:
                        scan = hist[tx] + T.if_then_else(tx + (1 << step) < radix, hist[tx + (1 << step)], 0)
                    T.sync_threads()
                    if tx < radix:
                        hist[tx] = scan
                    T.sync_threads()
                if tx < radix:
                    if hist[tx] >= need and hist[tx + 1] < need:
                        found[0] = tx
                T.sync_threads()
                need = need - hist[found[0] + 1]
                prefix = prefix | (T.cast(found[0], "uint32") << T.cast(shift, "uint32"))
                T.sync_threads()

            # Gather: keys above the threshold first, then the first `need` equal to it.
            if tx < 2:
                counts[tx] = 0
            for i in T.serial(T.ceildiv(size, threads)):
                if i * threads + tx < size:
                    cand_key[i * threads + tx] = T.uint32(0)  # below every real key: sorts last
                    cand_idx[i * threads + tx] = 2147483647
            T.sync_threads()
            for i in T.serial(T.ceildiv(T.if_then_else(take > 0, hi - lo, 0), threads)):
                if lo + i * threads + tx < hi:
                    key = _to_key(T, Scores[b, row, lo + i * threads + tx])
                    if key > prefix:
                        pos = T.atomic_add(counts[0], 1, return_prev=True)
                        cand_key[pos] = key
                        cand_idx[pos] = lo + i * threads + tx
                    elif key == prefix:
                        pos = T.atomic_add(counts[1], 1, return_prev=True)
                        if pos < need:
                            cand_key[take - need + pos] = key
                            cand_idx[take - need + pos] = lo + i * threads + tx
            T.sync_threads()

            # Bitonic sort, descending by (key, then -index).
            for stage in T.serial(log_size):
                for sub in T.serial(stage + 1):
                    log_stride = stage - sub
                    for i in T.serial(T.ceildiv(size // 2, threads)):
                        if i * threads + tx < size // 2:
                            # Pair number -> its lower slot: insert a 0 bit at log_stride.
                            pos = ((i * threads + tx) >> log_stride << (log_stride + 1)) \
                                | ((i * threads + tx) & ((1 << log_stride) - 1))
                            other = pos + (1 << log_stride)
                            # In blocks with bit (stage + 1) clear, the larger goes first.
                            if ((cand_key[other] > cand_key[pos]) | ((cand_key[other] == cand_key[pos])
                                                                     & (cand_idx[other] < cand_idx[pos]))) \
                                    == ((pos & (2 << stage)) == 0):
                                swap_key = cand_key[pos]
                                swap_idx = cand_idx[pos]
                                cand_key[pos] = cand_key[other]
                                cand_idx[pos] = cand_idx[other]
                                cand_key[other] = swap_key
                                cand_idx[other] = swap_idx
                    T.sync_threads()

            for i in T.serial(T.ceildiv(topk, threads)):
                pos = i * threads + tx
                if pos < take:
                    Values[b, s, pos] = _from_key(T, cand_key[pos])
                    Indices[b, s, pos] = T.cast(cand_idx[pos], "int64")
                elif pos < topk:
                    # Fillers: the (pos - take)-th key outside [lo, hi).
                    other = pos - take
                    Values[b, s, pos] = -T.infinity("float32")
                    Indices[b, s, pos] = T.cast(T.if_then_else(other < lo, other, other - lo + hi), "int64")

    # Every barrier is placed by hand: the automatic sync pass cannot see that the data-dependent
    # shared-memory slots (histogram bins, atomically claimed candidates, bitonic pairs) are
    # disjoint across threads, and would put barriers inside the swaps.
    return tilelang.compile(select, target=TARGET,
                            pass_configs={tilelang.PassConfigKey.TL_DISABLE_THREAD_STORAGE_SYNC: True})


def compile_for_sm90a(heads: int = 64, dim: int = 128, dtype: torch.dtype = torch.bfloat16,
                      topk: Optional[int] = 2048, has_bias: bool = False) -> dict:
    """Build (or fetch from the cache) the kernels of one config for sm_90a; nvcc runs, no GPU is
    needed. Returns the compiled kernels by name (``.get_kernel_source()`` gives the CUDA)."""
    name = _DTYPES[dtype]
    built = {"scores": _scores_kernel(heads, dim, name, has_bias, True),
             "scores_band": _scores_kernel(heads, dim, name, has_bias, False)}
    if topk:
        built["select"] = _select_kernel(topk)
    return built


def tilelang_unsupported_reason(q, k, weights, *, bias=None, lower=None, upper=None,
                                topk=None) -> Optional[str]:
    """None when the TileLang kernels can serve the call, else a one-line reason."""
    reason = tilelang_device_reason((q, k, weights, bias), "tilelang indexer kernels")
    if reason is not None:
        return reason
    if q.dtype not in _DTYPES or k.dtype != q.dtype:
        return f"dtypes q {q.dtype}, k {k.dtype} (the tilelang kernels take bfloat16/float16, the same for both)"
    heads, dim = q.shape[2], q.shape[3]
    if dim not in _HEAD_DIMS:
        return f"head dim {dim} not in the compiled set {_HEAD_DIMS}"
    if heads not in _HEADS:
        return f"{heads} heads not in the compiled set {_HEADS}"
    if topk is not None and topk > _MAX_TOPK:
        return f"topk {topk} > {_MAX_TOPK} (the selector sorts in shared memory)"
    if max(q.shape[0] * q.shape[1], k.shape[1]) >= _BIG:
        return "sequence too long for int32 positions"
    return None


def _bounds(lower, upper) -> tuple[int, int]:
    return (-_BIG if lower is None else max(-_BIG, min(_BIG, lower)),
            _BIG if upper is None else max(-_BIG, min(_BIG, upper)))


def _prepare(q, k, weights, bias, topk=None):
    from .indexer_ref import check_indexer_args
    check_indexer_args(q, k, weights, bias=bias, topk=topk)
    reason = tilelang_unsupported_reason(q, k, weights, bias=bias, topk=topk)
    if reason is not None:
        raise ValueError(f"the tilelang indexer kernels cannot serve this call: {reason}")
    batch, seq, heads, dim = q.shape
    keys = k.shape[1]
    # TMA descriptors need 16-byte aligned bases (a view at an odd offset gets copied).
    q, k = (t.contiguous() if t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.contiguous_format)
            for t in (q, k))
    qf = q.view(batch, seq * heads, dim)
    if bias is not None:
        # Compact [BB in {1, B}, BS in {1, S}, T]: the kernel broadcasts batch and query rows.
        bias = bias.float()
        bias = bias.reshape((1,) * (3 - bias.dim()) + tuple(bias.shape))
        bias = bias.expand(bias.shape[0], bias.shape[1], keys).contiguous()
    return qf, k, weights.float().contiguous(), bias


def indexer_scores_tilelang(q, k, weights, *, bias=None, lower: Optional[int] = None,
                            upper: Optional[int] = None) -> torch.Tensor:
    """scores [B, S, T] fp32 (see dsgraph/ops/indexer.py)."""
    qf, k, weights, bias = _prepare(q, k, weights, bias)
    batch, seq = weights.shape[:2]
    out = torch.empty(batch, seq, k.shape[1], dtype=torch.float32, device=q.device)
    if out.numel() == 0:  # no empty grids to launch
        return out
    kernel = _scores_kernel(q.shape[2], q.shape[3], _DTYPES[q.dtype], bias is not None, True)
    kernel(qf, k, weights, out if bias is None else bias, out, 0, *_bounds(lower, upper))
    return out


def indexer_topk_tilelang(q, k, weights, *, topk: int, bias=None, lower: Optional[int] = None,
                          upper: Optional[int] = None, chunk_bytes: int = _CHUNK_BYTES):
    """(values [B, S, K] fp32, indices [B, S, K] int64) = torch.topk(scores, K), sorted descending;
    the scores exist one chunk of queries at a time (at most ``chunk_bytes``)."""
    qf, k, weights, bias = _prepare(q, k, weights, bias, topk)
    batch, seq = weights.shape[:2]
    keys = k.shape[1]
    values = torch.empty(batch, seq, topk, dtype=torch.float32, device=q.device)
    indices = torch.empty(batch, seq, topk, dtype=torch.int64, device=q.device)
    if values.numel() == 0:
        return values, indices
    block_q = _scores_config(q.shape[2])["block_q"]
    rows = max(block_q, chunk_bytes // (4 * batch * max(keys, 1)) // block_q * block_q)
    buffer = torch.empty(batch * min(rows, seq) * keys, dtype=torch.float32, device=q.device)
    scores = _scores_kernel(q.shape[2], q.shape[3], _DTYPES[q.dtype], bias is not None, False)
    select = _select_kernel(topk)
    band = _bounds(lower, upper)
    for s_begin in range(0, seq, rows):
        chunk = buffer[:batch * min(rows, seq - s_begin) * keys].view(batch, -1, keys)
        scores(qf, k, weights, chunk if bias is None else bias, chunk, s_begin, *band)
        select(chunk, values, indices, s_begin, *band)
    return values, indices
