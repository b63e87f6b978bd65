"""Tile / schedule sweep of the TileLang attention kernel (dsgraph/kernels/attention_tilelang.py).

bf16, B=1, 32 query / 8 kv heads x 128, S=8192, two bands: causal and a 1024-key window with a
per-head sink. For each candidate ``FwdConfig`` it times the forward; for each candidate
``BwdConfig`` the forward (default config) plus that backward, as one step. TFLOP/s counts the
visible score entries x 4*H*D, x3.5 for forward+backward (as benchmarks/attention.py). Every
candidate's outputs and gradients are compared with the default config's (max |diff|, relative to
the largest value): a fast config that is wrong shows there. SDPA (causal) is timed as a yardstick.
Copy the winners into ``CONFIGS`` in the kernel file.

Kernels are built first in parallel worker processes, which fill TileLang's disk cache; the timed
process then loads them from it. About 2-3 minutes on an H100 with a cold cache.

    python benchmarks/attention_tilelang_sweep.py [--only causal|window] [--markdown FILE]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import time

import torch
from _harness import emit, markdown_table, parse_bench_args, run_label, time_ms

from dsgraph.kernels import attention_tilelang as atl

B, HQ, HKV, S, D = 1, 32, 8, 8192, 128
WINDOW = 1024
F, Bw = atl.FwdConfig, atl.BwdConfig
FWD_CANDIDATES = {
    "128x128 s2 (default)": F(),
    "128x128 s1": F(stages=1),
    "128x64 s2": F(block_n=64),
    "192x128 3wg s2": F(block_m=192, threads=384),
}
BWD_CANDIDATES = {
    "64x128 s2 (default)": Bw(),
    "64x128 s1": Bw(stages=1),
}
BANDS = {"causal": (None, 0, False), "window": (-(WINDOW - 1), 0, True)}  # (lower, upper, sink)


def _build(job):
    """One kernel build in a worker process (fills the disk cache); returns an error line or None."""
    kind, dim, has_sink, cfg = job
    try:
        if kind == "prep":
            atl._prep_kernel(D, "bfloat16")
        elif kind == "fwd":
            atl._fwd_kernel(dim, dim, "bfloat16", has_sink, cfg)
        elif kind == "dkdv":
            atl._dkdv_kernel(dim, dim, "bfloat16", cfg)
        else:
            atl._dq_kernel(dim, dim, "bfloat16", cfg)
    except Exception as exc:  # reported per candidate; the others still run
        return f"{kind} {cfg}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ''}"
    return None


def prebuild(bands):
    jobs = {("prep", D, False, None)}
    for _, _, sink in bands:
        jobs |= {("fwd", D, sink, cfg) for cfg in FWD_CANDIDATES.values()}
    for cfg in BWD_CANDIDATES.values():
        jobs |= {("dkdv", D, False, cfg), ("dq", D, False, cfg)}
    start = time.time()
    ctx = multiprocessing.get_context("spawn")  # no CUDA state is forked
    with concurrent.futures.ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1), mp_context=ctx) as pool:
        failures = [e for e in pool.map(_build, sorted(jobs, key=str)) if e]
    print(f"built {len(jobs)} kernels in {time.time() - start:.0f} s; failed: {failures or 'none'}", flush=True)


def visible_pairs(window):
    return sum(min(i + 1, window) for i in range(S)) if window else S * (S + 1) // 2


def rel_diff(got, want):
    return max(((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30)).item()
               for g, w in zip(got, want) if w is not None)


def main():
    parser = argparse.ArgumentParser(prog="attention_tilelang_sweep.py")
    parser.add_argument("--only", choices=sorted(BANDS), default=None)
    args = parse_bench_args(parser)
    device = torch.device("cuda")
    bands = {k: v for k, v in BANDS.items() if args.only in (None, k)}
    prebuild(bands.values())

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, HQ, S, D, device=device, generator=gen).bfloat16()
    k = torch.randn(B, HKV, S, D, device=device, generator=gen).bfloat16()
    v = torch.randn(B, HKV, S, D, device=device, generator=gen).bfloat16()
    dout = torch.randn(B, HQ, S, D, device=device, generator=gen).bfloat16()
    sink_t = torch.randn(HQ, device=device, generator=gen)
    scale = D ** -0.5
    lines = []
    for band, (lower, upper, has_sink) in bands.items():
        kw = dict(scale=scale, sink=sink_t if has_sink else None, lower=lower, upper=upper)
        flops = 4 * B * HQ * D * visible_pairs(WINDOW if band == "window" else None)
        rows = []

        def row(name, what, ms, work, diff):
            rows.append(f"| {name} | {what} | {ms:.3f} | {work / ms / 1e9:.0f} | {diff} |")
            print(rows[-1], flush=True)

        out0, lse0 = atl.attention_tilelang(q, k, v, config=F(), **kw)
        ref_grads = atl.attention_tilelang_backward(q, k, v, out0, lse0, dout, config=Bw(), **kw)
        for name, cfg in FWD_CANDIDATES.items():
            try:
                out, _ = atl.attention_tilelang(q, k, v, config=cfg, **kw)
                diff = f"{rel_diff([out], [out0]):.1e}"
                ms = time_ms(lambda: atl.attention_tilelang(q, k, v, config=cfg, **kw), device, 500)
            except Exception as exc:
                rows.append(f"| {name} | fwd | failed: {type(exc).__name__} | | |")
                print(rows[-1], exc, flush=True)
                continue
            row(name, "fwd", ms, flops, diff)
        for name, cfg in BWD_CANDIDATES.items():
            def step():
                out, lse = atl.attention_tilelang(q, k, v, **kw)
                return atl.attention_tilelang_backward(q, k, v, out, lse, dout, config=cfg, **kw)
            try:
                diff = f"{rel_diff(step(), ref_grads):.1e}"
                ms = time_ms(step, device, 500)
            except Exception as exc:
                rows.append(f"| {name} | fwd+bwd | failed: {type(exc).__name__} | | |")
                print(rows[-1], exc, flush=True)
                continue
            row(name, "fwd+bwd", ms, 3.5 * flops, diff)
        if band == "causal":
            import torch.nn.functional as fn
            sdpa = lambda: fn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
            row("SDPA", "fwd", time_ms(sdpa, device, 500), flops, "-")
            qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))

            def sdpa_step():
                fn.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=True).backward(dout)
            row("SDPA", "fwd+bwd", time_ms(sdpa_step, device, 500), 3.5 * flops, "-")
        title = (f"TileLang attention sweep, {band}{f' {WINDOW} + sink' if band == 'window' else ''}: bf16 "
                 f"B={B} Hq={HQ} Hkv={HKV} S={S} D={D} ({run_label(args.commit)})")
        lines += markdown_table(title, "| config | pass | ms | TFLOP/s | max rel diff vs default |", rows) + [""]
    emit("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
