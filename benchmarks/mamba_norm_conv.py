"""Eager vs plain torch.compile vs dsgraph (per backend) on the Mamba2 mixer's gated RMSNorm and causal
conv1d + SiLU, written as models/nemotron_v3.py writes them (GPU).

    python benchmarks/mamba_norm_conv.py [--seqs 4096,16384] [--markdown FILE]

Nemotron-H widths: intermediate 4096 in 8 groups (the norm: y [1, L, 4096] bf16 from the scan, z the
first 4096 channels of in_proj's output, fp32 weight, fp32 output as the model's), conv_dim 4096 +
2*8*128 = 6144 with K = 4 and bias (the conv reads the xBC slice of in_proj's output in place). fwd and
fwd+bwd (gradients to the inputs and parameters). GB/s counts one read of each input and one write of
each output (forward) and twice that plus the gradients (fwd+bwd). Times are medians of
triton.testing.do_bench.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import dsgraph
from attention import emit, fmt_ms as fmt, markdown_table, measure, parse_bench_args, ratio, run_label
from dsgraph.models.nemotron_v3 import MambaRMSNormGated

D, GROUPS, CONV_DIM, K, HEADS = 4096, 8, 4096 + 2 * 8 * 128, 4, 64
BACKENDS = {"gated_rmsnorm": ("mamba_ssm", "triton"), "causal_conv1d": ("triton",)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="4096,16384")
    args = parse_bench_args(parser)
    device = torch.device("cuda")
    norm = MambaRMSNormGated(D, D // GROUPS).to(device)
    conv = torch.nn.Conv1d(CONV_DIM, CONV_DIM, K, groups=CONV_DIM, padding=K - 1).to(device, torch.bfloat16)

    def gated_norm(y, proj):
        return norm(y, proj[..., :D])

    def conv_silu(y, proj):  # NemotronV3Mamba2Mixer._conv without the cache
        x = proj[..., D:D + CONV_DIM].transpose(1, 2)
        return F.silu(conv(x)[..., :x.shape[2]].transpose(1, 2))

    header = ("| op | L | pass | eager ms | torch.compile ms | dsgraph mamba_ssm ms | dsgraph triton ms "
              "| best vs eager | best vs compile | best GB/s |")
    rows = []
    print(header, flush=True)
    for op, fn, out_bytes in (("gated_rmsnorm", gated_norm, 4 * D), ("causal_conv1d", conv_silu, 2 * CONV_DIM)):
        for seq in map(int, args.seqs.split(",")):
            for backward in (False, True):
                torch.manual_seed(0)
                y = torch.randn(1, seq, D, device=device, dtype=torch.bfloat16, requires_grad=backward)
                proj = torch.randn(1, seq, D + CONV_DIM + HEADS, device=device, dtype=torch.bfloat16,
                                   requires_grad=backward)
                inputs = (y, proj)
                in_bytes = seq * 2 * (2 * D if op == "gated_rmsnorm" else CONV_DIM)
                moved = (in_bytes + seq * out_bytes) * (3 if backward else 1)
                eager_ms = measure(fn, inputs, backward)
                compile_ms = measure(torch.compile(fn), inputs, backward)
                torch._dynamo.reset()
                cells, times = [], []
                for backend in ("mamba_ssm", "triton"):
                    if backend not in BACKENDS[op]:
                        cells.append("-")
                        continue
                    opt = dsgraph.optimize(fn, policy=f"{backend};strict")
                    try:
                        ms = measure(opt, inputs, backward)
                        served = {r.backend for r in dsgraph.explain(opt).rewrites if r.op == op}
                        cells.append(fmt(ms) if served == {backend} else f"not rewritten ({served})")
                        times.append(ms if served == {backend} else None)
                    except Exception as exc:  # a backend that cannot serve the site: say why, keep going
                        cells.append(f"n/a ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
                    torch._dynamo.reset()
                done = [t for t in times if t is not None]
                best = min(done) if done else None
                gbs = "-" if best is None else f"{moved / best / 1e6:.0f}"
                row = (f"| {op} | {seq} | {'fwd+bwd' if backward else 'fwd'} | {fmt(eager_ms)} | {fmt(compile_ms)} | "
                       + " | ".join(cells) + f" | {ratio(eager_ms, best)} | {ratio(compile_ms, best)} | {gbs} |")
                rows.append(row)
                print(row, flush=True)
                del y, proj, inputs
                torch.cuda.empty_cache()
    emit("\n".join(markdown_table(f"Mamba2 gated RMSNorm and causal conv1d + SiLU, {run_label(args.commit)}",
                                   header, rows)), args.markdown)


if __name__ == "__main__":
    main()
