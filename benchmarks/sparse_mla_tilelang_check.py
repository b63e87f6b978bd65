"""GPU check of the TileLang sparse MLA kernels (dsgraph/kernels/sparse_attention_tilelang.py):
correctness against the fp32 torch reference, then forward and backward timings.

    python benchmarks/sparse_mla_tilelang_check.py [--batch 1] [--seq 4096] [--keys 4096] [--heads 128]
                                                   [--topk 2048] [--skip-check]

Indices: per query row, K distinct random keys among the causally valid ones (j <= s + T - S), -1
where a row has fewer. Times are medians of ``triton.testing.do_bench``. FLOPs count every one of
the K slots (masked ones included), as TileLang's and FlashMLA's reports do:
forward  B*S*H*K*2*(576 + 512)            (QK^T + PV; goal >= 450 TFLOP/s on H100)
backward B*S*H*K*2*(3*576 + 2*512)        (QK^T recompute, dO V^T, dS K, dS^T Q, P^T dO; goal >= 100)
The backward line also gives the rate in forward FLOPs (the same time over the forward's count).
"""
from __future__ import annotations

import argparse

import torch
import triton

from dsgraph.kernels.sparse_attention_ref import sparse_attention_ref, sparse_attention_ref_backward
from dsgraph.kernels.sparse_attention_tilelang import sparse_mla_bwd_tilelang, sparse_mla_fwd_tilelang

D_QK, D_V = 576, 512


def inputs(batch, seq, keys, heads, topk, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, seq, heads, D_QK, device="cuda", generator=gen).bfloat16()
    kv = torch.randn(batch, keys, 1, D_QK, device="cuda", generator=gen).bfloat16()
    dout = torch.randn(batch, seq, heads, D_V, device="cuda", generator=gen).bfloat16()
    idx = torch.empty(batch, seq, topk, dtype=torch.int32, device="cuda")
    for start in range(0, seq, 1024):  # [rows, T] random scores at a time, causal band only
        rows = torch.arange(start, min(seq, start + 1024), device="cuda")
        score = torch.rand(batch, len(rows), keys, device="cuda", generator=gen)
        score = score.masked_fill(torch.arange(keys, device="cuda") > rows[:, None] + keys - seq, -1.0)
        vals, top = score.topk(min(topk, keys), dim=-1)
        top = top.masked_fill(vals < 0, -1).int()
        idx[:, rows, :top.shape[-1]] = top
        idx[:, rows, top.shape[-1]:] = -1
    return q, kv, idx[:, :, None].contiguous(), dout


def rel_err(actual, expected):
    actual, expected = actual.float(), expected.float()
    ok = expected.isfinite()
    assert torch.equal(ok, actual.isfinite()), "non-finite pattern differs"
    return ((actual[ok] - expected[ok]).abs().max() / expected[ok].abs().max().clamp_min(1e-6)).item()


def check(q, kv, idx, dout, scale):
    """Errors relative to each tensor's max against the fp32 reference on the same bf16 values."""
    out, lse = sparse_mla_fwd_tilelang(q, kv, idx, scale=scale, d_v=D_V)
    dq, dkv = sparse_mla_bwd_tilelang(q, kv, out, dout, idx, lse, scale=scale, d_v=D_V)
    kw = dict(scale=scale, d_v=D_V, upper=kv.shape[1] - q.shape[1])
    qf, kf = q.float(), kv.float()
    ref_out, ref_lse = sparse_attention_ref(qf, kf, None, idx[:, :, 0], **kw)
    ref_dq, ref_dkv, _ = sparse_attention_ref_backward(qf, kf, None, ref_out, ref_lse, dout.float(), idx[:, :, 0], **kw)
    errs = {name: rel_err(a, e) for name, a, e in
            (("out", out, ref_out), ("lse", lse, ref_lse), ("dq", dq, ref_dq), ("dkv", dkv, ref_dkv))}
    print("max error / max |ref|: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    return errs


def bench(q, kv, idx, dout, scale):
    batch, seq, heads, _ = q.shape
    topk = idx.shape[-1]
    fwd_flops = batch * seq * heads * topk * 2 * (D_QK + D_V)
    bwd_flops = batch * seq * heads * topk * 2 * (3 * D_QK + 2 * D_V)
    out, lse = sparse_mla_fwd_tilelang(q, kv, idx, scale=scale, d_v=D_V)
    sparse_mla_bwd_tilelang(q, kv, out, dout, idx, lse, scale=scale, d_v=D_V)  # compiled before timing
    torch.cuda.synchronize()
    ms_fwd = triton.testing.do_bench(lambda: sparse_mla_fwd_tilelang(q, kv, idx, scale=scale, d_v=D_V),
                                     return_mode="median")
    ms_bwd = triton.testing.do_bench(
        lambda: sparse_mla_bwd_tilelang(q, kv, out, dout, idx, lse, scale=scale, d_v=D_V), return_mode="median")
    print(f"B={batch} S={seq} T={kv.shape[1]} H={heads} K={topk} bf16")
    print(f"forward  {ms_fwd:8.3f} ms  {fwd_flops / ms_fwd * 1e-9:6.1f} TFLOP/s  (goal 450)")
    print(f"backward {ms_bwd:8.3f} ms  {bwd_flops / ms_bwd * 1e-9:6.1f} TFLOP/s  (goal 100; "
          f"{fwd_flops / ms_bwd * 1e-9:.1f} in forward FLOPs)")
    return ms_fwd, ms_bwd


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--keys", type=int, default=None, help="T (default: --seq)")
    parser.add_argument("--heads", type=int, default=128)
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--skip-check", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    q, kv, idx, dout = inputs(args.batch, args.seq, args.keys or args.seq, args.heads, args.topk)
    scale = D_QK ** -0.5
    if not args.skip_check:
        check(q, kv, idx, dout, scale)
    bench(q, kv, idx, dout, scale)


if __name__ == "__main__":
    main()
