"""Eager vs plain torch.compile vs dsgraph (per backend) on the DeepSeek V3.2 Lightning Indexer and
the Hadamard rotation (GPU).

    python benchmarks/deepseek_v32_indexer.py [--seqs 4096,16384,65536] [--markdown FILE]

Indexer: B=1, S=T, 64 heads x 128, bf16 q/k, fp32 weights, causal mask built with triu, top-k 2048,
written as models/deepseek_v32.py writes it (einsum of the fp32 casts -> [B, S, H, T], ReLU, weighted
head sum, + mask, topk). "topk" is the sparse-attention path (forward only: indices carry no
gradient); "scores fwd+bwd" is the KL-training path (the scores are the output, backward to q, k and
the weights). TFLOP/s counts the visible (causal) score entries: 2*H*D per entry forward, 3x that for
fwd+bwd. Hadamard: the butterfly of models/deepseek_v32.py:hadamard_transform_torch on bf16 rows;
GB/s counts one read and one write of the tensor. Times are medians of triton.testing.do_bench.
"""
from __future__ import annotations

import argparse

import torch

import dsgraph
from attention import emit, fmt_ms as fmt, markdown_table, measure, parse_bench_args, ratio, run_label
from dsgraph.models import hadamard_transform_torch

H, D, TOPK = 64, 128, 2048
H100_BF16_PEAK = 989.0  # TFLOP/s, dense bf16 (SXM datasheet)
H100_HBM_PEAK = 3350.0  # GB/s, HBM3 (SXM datasheet)
BACKENDS = ("tilelang", "triton")


def indexer_scores(q, k, weights):
    """q [B, S, H, D], k [B, T, D], weights [B, S, H] fp32 -> causally masked scores [B, S, T] fp32."""
    seq, keys = q.shape[1], k.shape[1]
    logits = torch.einsum("bshd,btd->bsht", q.float(), k.float())
    scores = (weights[..., None] * torch.relu(logits)).sum(dim=2)
    mask = torch.full((seq, keys), float("-inf"), device=q.device).triu_(1)
    return scores + mask


def indexer_topk(q, k, weights):
    return indexer_scores(q, k, weights).topk(min(TOPK, k.shape[1]), dim=-1)[1]


def hadamard(x):
    return hadamard_transform_torch(x, x.shape[-1] ** -0.5)


def backends_of(fn, op: str) -> str:
    report = dsgraph.explain(fn)
    return ",".join(sorted({r.backend for r in report.rewrites if r.op == op and not r.rolled_back})) or "none"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="4096,16384,65536")
    parser.add_argument("--scores-seqs", default="4096,16384", help="S for the scores fwd+bwd rows")
    parser.add_argument("--hadamard-rows", default="1048576x128,65536x128,4096x16384")
    args = parse_bench_args(parser)
    device = torch.device("cuda")

    header = ("| case | S | eager ms | torch.compile ms | "
              + " | ".join(f"dsgraph {b} ms" for b in BACKENDS)
              + " | best vs eager | best vs compile | best TFLOP/s (% of 989) |")
    rows = []
    print(header, flush=True)
    cases = [("topk", indexer_topk, False, [int(s) for s in args.seqs.split(",") if s]),
             ("scores fwd+bwd", indexer_scores, True, [int(s) for s in args.scores_seqs.split(",") if s])]
    for case, fn, backward, seqs in cases:
        for seq in seqs:
            torch.manual_seed(0)
            q = torch.randn(1, seq, H, D, device=device, dtype=torch.bfloat16, requires_grad=backward)
            k = torch.randn(1, seq, D, device=device, dtype=torch.bfloat16, requires_grad=backward)
            w = torch.randn(1, seq, H, device=device, requires_grad=backward) * (H * D) ** -0.5
            w = w.detach().requires_grad_(backward)
            inputs = (q, k, w)
            # Eager and plain torch.compile hold [B, S, H, T] fp32 (S^2 * 256 bytes): skip what cannot fit.
            fits = seq * seq * H * 4 * (3 if backward else 2) < 0.8 * torch.cuda.get_device_properties(0).total_memory
            eager_ms = measure(fn, inputs, backward) if fits else None
            compile_ms = measure(torch.compile(fn), inputs, backward) if fits else None
            ds, served = [], []
            for backend in BACKENDS:
                opt = dsgraph.optimize(fn, policy=f"{backend};strict")
                try:
                    ds.append(measure(opt, inputs, backward))
                    served.append(backends_of(opt, "indexer_topk" if case == "topk" else "indexer_scores"))
                except Exception as exc:  # a backend that cannot serve the site: say why, keep going
                    ds.append(None)
                    served.append(f"n/a ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
                torch._dynamo.reset()
            done = [t for t in ds if t is not None]
            best = min(done) if done else None
            visible = seq * (seq + 1) // 2
            work = 2 * H * D * visible * (3 if backward else 1)
            tflops = "-" if best is None else f"{work / best / 1e9:.0f} ({work / best / 1e9 / H100_BF16_PEAK:.0%})"
            row = (f"| {case} | {seq} | {fmt(eager_ms)} | {fmt(compile_ms)} | "
                   + " | ".join(fmt(t) if t is not None else s for t, s in zip(ds, served))
                   + f" | {ratio(eager_ms, best)} | {ratio(compile_ms, best)} | {tflops} |")
            rows.append(row)
            print(row, "served by", served, flush=True)
            del q, k, w, inputs
            torch._dynamo.reset()
            torch.cuda.empty_cache()

    h_header = ("| Hadamard rows x n | eager ms | torch.compile ms | "
                + " | ".join(f"dsgraph {b} ms" for b in BACKENDS)
                + " | best GB/s (% of 3350) |")
    h_rows = []
    print(h_header, flush=True)
    for spec in filter(None, args.hadamard_rows.split(",")):
        n_rows, n = map(int, spec.split("x"))
        x = torch.randn(n_rows, n, device=device, dtype=torch.bfloat16)
        eager_ms = measure(hadamard, (x,), False)
        compile_ms = measure(torch.compile(hadamard), (x,), False)
        ds = []
        for backend in BACKENDS:
            opt = dsgraph.optimize(hadamard, policy=f"{backend};strict")
            try:
                ds.append(measure(opt, (x,), False))
                served = backends_of(opt, "hadamard")
                if served != backend:  # not rewritten: the time is Inductor's, not the kernel's
                    print(f"hadamard {spec} {backend}: served by {served}\n{dsgraph.explain(opt)}", flush=True)
                    ds[-1] = None
            except Exception as exc:
                print(f"hadamard {spec} {backend}: {type(exc).__name__}: {exc}", flush=True)
                ds.append(None)
            torch._dynamo.reset()
        done = [t for t in ds if t is not None]
        best = min(done) if done else None
        gbs = "-" if best is None else f"{2 * x.numel() * 2 / best / 1e6:.0f} ({2 * x.numel() * 2 / best / 1e6 / H100_HBM_PEAK:.0%})"
        row = f"| {n_rows} x {n} | {fmt(eager_ms)} | {fmt(compile_ms)} | " + " | ".join(map(fmt, ds)) + f" | {gbs} |"
        h_rows.append(row)
        print(row, flush=True)
        del x
        torch.cuda.empty_cache()

    title = run_label(args.commit)
    table = "\n".join(markdown_table(f"Lightning Indexer, {title}; B=1, S=T, {H} heads x {D}, bf16, top-k {TOPK}, "
                                      "causal", header, rows)
                       + [""] + markdown_table(f"Hadamard (bf16, scale n^-1/2), {title}", h_header, h_rows))
    emit(table, args.markdown)


if __name__ == "__main__":
    main()
