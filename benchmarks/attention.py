"""Eager vs plain torch.compile vs dsgraph on eager attention (GPU).

    python benchmarks/attention.py [--seqs 1024,4096,8192,16384,32768,65536] [--cases causal,window+sink]
        [--eager-max 16384] [--markdown FILE]

B=1, 32 query / 8 kv heads x 128, bf16. Eager is written as models write it: repeat_kv, an additive
-inf mask built with triu (the window from two triu's, the sink as an extra softmax column), fp32
softmax. "causal" has no window; "window+sink" a 1024-key sliding window and a per-head sink.
FlexAttention is torch.compile(flex_attention) with a block mask built once outside the timing (the
sink as softmax(scores) * sigmoid(lse - sink)); "autotune" is dsgraph.optimize(fn, policy="autotune")
with a fresh cache, so the choice is measured in this run (its candidates' times are printed).
"dsgraph triton" / "dsgraph tilelang" / "dsgraph flex" force that backend for the attention site. Cells: median ms
(_harness.time_ms: 3 to 50 timed calls, about a second of them, each after an L2-evicting write) / peak GiB
allocated during one step above what was allocated before it; fwd+bwd is out.backward(dout) after the forward.
TFLOP/s counts the visible (unmasked) score entries only: 4*B*H*D per entry forward, 2.5x that
backward, so every column is measured against the same useful work.
"""
from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time

import torch

import dsgraph
from _harness import (emit, fmt_gib, fmt_ms, free, make_step, markdown_table, parse_bench_args, ratio,  # noqa: F401
                      run_label, time_ms)  # (some re-exported to the other benchmarks)

B, HQ, HKV, D, WINDOW = 1, 32, 8, 128, 1024
H100_BF16_PEAK = 989.0  # TFLOP/s, dense bf16 (SXM datasheet)


def eager_attention(q, k, v, sinks, *, window: int | None):
    """q [B, Hq, S, D], k/v [B, Hkv, S, D], sinks [Hq] or None -> [B, Hq, S, D]."""
    batch, heads, seq, dim = q.shape
    group = heads // k.shape[1]
    k = k[:, :, None].expand(batch, k.shape[1], group, seq, dim).reshape(batch, heads, seq, dim)
    v = v[:, :, None].expand(batch, v.shape[1], group, seq, dim).reshape(batch, heads, seq, dim)
    scores = (q @ k.transpose(-2, -1)).float() * dim ** -0.5
    mask = torch.full((seq, seq), float("-inf"), device=q.device).triu(1)
    if window is not None:
        mask = mask + torch.full((seq, seq), float("-inf"), device=q.device).tril(-window)
    scores = scores + mask
    if sinks is not None:
        scores = torch.cat([scores, sinks.float().view(1, heads, 1, 1).expand(batch, heads, seq, 1)], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    return probs.to(v.dtype) @ v


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def flex_baseline(seq: int, window: int | None, device):
    """FlexAttention as a user writes it: a block mask for the band (built once), compiled
    flex_attention, the sink from its lse."""
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask

    def band(b, h, q_idx, kv_idx):
        causal = kv_idx <= q_idx
        return causal if window is None else causal & (q_idx - kv_idx < window)
    # compiled: never materialises the [S, S] mask (4 GiB at S = 64k)
    block_mask = torch.compile(create_block_mask)(band, None, None, seq, seq, device=device)

    def fn(q, k, v, sinks):
        if sinks is None:
            return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=True)
        out, aux = _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=True,
                                    return_aux=AuxRequest(lse=True))
        keep = torch.sigmoid(aux.lse - sinks.float().view(1, -1, 1))
        return (out.float() * keep[..., None]).to(out.dtype)
    return fn


def speedup(baseline, ms):
    """Two decimals: the goals are 0.95x SDPA and 1.5x / 2x Flex."""
    return "-" if baseline is None or ms is None else f"{baseline / ms:.2f}x"


def visible_pairs(seq: int, window: int | None) -> int:
    if window is None:
        return seq * (seq + 1) // 2
    return sum(min(i + 1, window) for i in range(seq))


def measure(fn, args, backward: bool):
    """Median ms of one call (``_harness.time_ms``: 3 to 50 timed calls, each after an L2-evicting
    write), None when it does not fit in memory. Also imported by other benchmarks."""
    step = make_step(fn, args, backward)
    try:
        step()  # compile / autotune outside the timing
        return time_ms(step, torch.device("cuda"))
    except torch.OutOfMemoryError:
        return None
    finally:
        free(torch.device("cuda"), args)


def peak_gib(fn, args, backward: bool):
    """Peak memory of one step above what is allocated before it, GiB (None when it does not fit)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        if backward:
            fn(*args).float().sum().backward()
        else:
            with torch.no_grad():
                fn(*args)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 30
    except torch.OutOfMemoryError:
        return None
    finally:
        for a in args:
            if isinstance(a, torch.Tensor):
                a.grad = None
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="1024,4096,8192,16384,32768,65536")
    parser.add_argument("--cases", default="causal,window+sink")
    parser.add_argument("--eager-max", type=int, default=16384,
                        help="largest S for eager and plain torch.compile ([S, S] fp32 scores per head)")
    parser.add_argument("--skip-columns", default="",
                        help="comma-separated columns not to run (their cells read 'not run'), e.g. 'dsgraph autotune'")
    args = parse_bench_args(parser)
    seqs = [int(s) for s in args.seqs.split(",")]
    skipped = {c.strip() for c in args.skip_columns.split(",") if c.strip()}
    os.environ["DSGRAPH_CACHE_DIR"] = tempfile.mkdtemp(prefix="dsgraph-bench-autotune-")
    # Six compiled columns of one function, forward and backward graphs: past Dynamo's default limit of 8
    # compiled versions per frame the later ones would silently run eager.
    torch._dynamo.config.recompile_limit = 64
    device = torch.device("cuda")
    columns = ("eager", "torch.compile", "SDPA", "FlexAttention", "dsgraph triton", "dsgraph tilelang", "dsgraph flex",
               "dsgraph auto", "dsgraph autotune")
    header = ("| case | S | pass | " + " | ".join(f"{c} ms / GiB" for c in columns)
              + " | auto / autotune backend | best dsgraph vs eager | vs compile | vs SDPA or Flex | "
              "autotune vs SDPA or Flex | "
              "best dsgraph TFLOP/s (% of 989) |")
    rows = []
    print(header, flush=True)
    cases = [c for c in (("causal", None, False), ("window+sink", WINDOW, True)) if c[0] in args.cases.split(",")]
    for case, window, with_sink in cases:
        for seq in seqs:
            torch.manual_seed(0)
            q = torch.randn(B, HQ, seq, D, device=device, dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(B, HKV, seq, D, device=device, dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(B, HKV, seq, D, device=device, dtype=torch.bfloat16, requires_grad=True)
            sinks = torch.randn(HQ, device=device, requires_grad=True) if with_sink else None
            inputs = (q, k, v, sinks)

            def fn(q, k, v, sinks):
                return eager_attention(q, k, v, sinks, window=window)

            def sdpa(q, k, v, sinks):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            fns = {"eager": fn if seq <= args.eager_max else None,
                   "torch.compile": torch.compile(fn) if seq <= args.eager_max else None,
                   "SDPA": sdpa if window is None else None, "FlexAttention": flex_baseline(seq, window, device),
                   "dsgraph triton": dsgraph.optimize(fn, policy="auto;attention=triton"),
                   "dsgraph tilelang": dsgraph.optimize(fn, policy="auto;attention=tilelang"),
                   "dsgraph flex": dsgraph.optimize(fn, policy="auto;attention=flex"),
                   "dsgraph auto": dsgraph.optimize(fn),
                   # compiled after "auto" for each graph, so "auto" is the policy's order, not the cached choice
                   "dsgraph autotune": dsgraph.optimize(fn, policy="autotune")}
            fns = {name: None if name in skipped else f for name, f in fns.items()}
            flops = 4 * B * HQ * D * visible_pairs(seq, window)
            for backward in (False, True):
                cells = {}
                for name, f in fns.items():
                    if name in skipped:
                        cells[name] = "not run"
                        continue
                    if f is None:
                        cells[name] = "cannot express" if name == "SDPA" else f"skipped (S > {args.eager_max})"
                        continue
                    started = time.perf_counter()
                    ms = measure(f, inputs, backward)
                    print(f"  {case} S={seq} {'fwd+bwd' if backward else 'fwd'} {name}: {fmt_ms(ms)} ms "
                          f"({time.perf_counter() - started:.0f} s incl. compile)", flush=True)
                    cells[name] = (ms, peak_gib(f, inputs, backward) if ms is not None else None)
                    torch.cuda.empty_cache()
                served = {}
                for name in (n for n in columns if n.startswith("dsgraph") and isinstance(cells[n], tuple)
                             and cells[n][0] is not None):
                    report = dsgraph.explain(fns[name])  # fwd and fwd+bwd compile separate graphs
                    sites = [r for r in report.rewrites if r.op == "attention" and r.graph == report.graphs]
                    served[name] = ",".join(sorted({r.backend for r in sites})) or "none"
                    forced = name.split()[1]
                    if forced in ("triton", "tilelang", "flex") and served[name] != forced:
                        cells[name] = f"{fmt_ms(cells[name][0])} (served by {served[name]})"
                    for r in sites if name == "dsgraph autotune" else ():  # each candidate's time
                        print(f"  autotune {case} S={seq} {'fwd+bwd' if backward else 'fwd'}: {r.tuning}: "
                              + ", ".join(f"{b} {t:.3f} ms" if isinstance(t, float) else f"{b} {t}"
                                          for b, t in r.timings.items()), flush=True)
                backends = [served.get(name, "-") for name in ("dsgraph auto", "dsgraph autotune")]
                ms_of = {n: c[0] if isinstance(c, tuple) else None for n, c in cells.items()}
                best = min((ms_of[n] for n in columns if n.startswith("dsgraph") and ms_of[n] is not None), default=None)
                work = flops * (3.5 if backward else 1.0)
                rate = "-" if best is None else f"{work / best / 1e9:.0f} ({work / best / 1e9 / H100_BF16_PEAK:.0%})"
                baseline = ms_of["SDPA"] if window is None else ms_of["FlexAttention"]
                row = (f"| {case} | {seq} | {'fwd+bwd' if backward else 'fwd'} | "
                       + " | ".join(c if isinstance(c, str) else f"{fmt_ms(c[0])} / {fmt_gib(c[1])}"
                                    if c[0] is not None else "OOM" for c in cells.values())
                       + f" | {' / '.join(backends)} | {ratio(ms_of['eager'], best)} | "
                       f"{ratio(ms_of['torch.compile'], best)} | {speedup(baseline, best)} | "
                       f"{speedup(baseline, ms_of['dsgraph autotune'])} | {rate} |")
                rows.append(row)
                print(row, flush=True)
            del q, k, v, sinks, inputs, fns
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    title = f"Attention, {run_label(args.commit)}; B={B}, {HQ}/{HKV} heads x {D}, bf16, window {WINDOW}"
    emit("\n".join(markdown_table(title, header, rows)), args.markdown)


if __name__ == "__main__":
    main()
