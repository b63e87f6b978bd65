"""Eager vs plain torch.compile vs dsgraph (per sparse-attention backend) on DeepSeek V3.2 sparse
MLA attention (GPU).

    python benchmarks/deepseek_v32_attention.py [--seqs 4096,16384,32768] [--model-seqs ...]
        [--reference-seqs 4096] [--markdown FILE]

Three tables, B=1, S=T, bf16, H=128 heads, top-k 2048, causal:
- kernel: ``dsgraph::sparse_attention`` called directly in the latent layout (q [B,S,H,576],
  kv [B,T,1,576], values = its first 512 dims), indices = top-k of random causally masked scores;
  the goals of issue 5 (TileLang forward >= 450 TFLOP/s, backward >= 100 TFLOP/s) are read here;
- layer: MLA attention as models/deepseek_v32.py:mla_attention writes it (MHA mode: per-head keys and
  values from kv_b_proj, [B,S,H,T] fp32 scores, the top-k scatter mask + causal mask, fp32 softmax),
  the indices from ``topk`` of an index-score input; dsgraph rewrites it to the sparse op and absorbs
  it into the latent form ("mha" rows: absorption disabled, the MHA-mode kernels);
- model: a 2-layer DeepseekV32ForCausalLM at the released widths (hidden 7168, H=128, q/kv ranks
  1536/512, 192/128 head dims, indexer 64 x 128) with dense MLPs (both layers; the MoE's experts are
  not the subject) and a 8192-token vocabulary (a 129280-column fp32 logit tensor alone is 17 GB at
  32k), fwd = logits, fwd+bwd = logits.backward.

TFLOP/s: B*S*(576+512)*K*2*H for the forward (the latent-form kernel's work, as FlashMLA counts it),
3.5x that for fwd+bwd (the backward's five products against the forward's two), against 989 (H100
SXM dense bf16). Times are medians of triton.testing.do_bench; memory is the peak allocated during
one step above what was allocated before it. A configuration whose eager [B,S,H,T] fp32 tensors cannot
fit is skipped with the reason printed.
"""
from __future__ import annotations

import argparse

import torch

import dsgraph
from attention import emit, fmt_gib, fmt_ms as fmt, markdown_table, measure, parse_bench_args, peak_gib, ratio, run_label
from dsgraph.models import DeepseekV32Config, DeepseekV32ForCausalLM, mla_attention

H, D_QK, D_V, D_NOPE, D_ROPE, TOPK = 128, 576, 512, 128, 64, 2048
H100_BF16_PEAK = 989.0  # TFLOP/s, dense bf16 (SXM datasheet)
BACKENDS = ("tilelang", "triton")
SLOW_VARIANTS = ("triton mha",)


def flops(seq: int, backward: bool) -> float:
    return seq * (D_QK + D_V) * min(TOPK, seq) * 2 * H * (3.5 if backward else 1.0)


def tflops(seq, backward, ms) -> str:
    if ms is None:
        return "-"
    rate = flops(seq, backward) / ms / 1e9
    return f"{rate:.0f} ({rate / H100_BF16_PEAK:.0%})"


def causal_topk(scores: torch.Tensor) -> torch.Tensor:
    """Top-k of index scores [B, S, T] under the causal mask: early rows get invalid (masked) entries."""
    seq, keys = scores.shape[1:]
    causal = torch.full((seq, keys), float("-inf"), device=scores.device).triu_(keys - seq + 1)
    return (scores + causal).topk(min(TOPK, keys), dim=-1)[1]


def mla_layer(q_nope, q_pe, kv, k_pe, weight, index_scores):
    """The V3.2 attention as the model writes it (see models/deepseek_v32.py:DeepseekV32Attention)."""
    batch, seq, keys = index_scores.shape
    causal = torch.full((seq, keys), float("-inf"), device=kv.device).triu_(keys - seq + 1)
    idx = causal_topk(index_scores)
    mask = torch.full((batch, seq, keys), float("-inf"), device=kv.device).scatter_(-1, idx, 0) + causal
    proj = lambda x: torch.nn.functional.linear(x, weight)  # noqa: E731  (kv_b_proj)
    return mla_attention(q_nope, q_pe, kv, k_pe, proj, mask, None, (D_NOPE + D_ROPE) ** -0.5, 128)[0]


def served(fn, op="sparse_attention") -> str:
    report = dsgraph.explain(fn)
    return ",".join(sorted({r.backend for r in report.rewrites if r.op == op and not r.rolled_back})) or "none"


def eager_fits(seq: int, backward: bool, per_entry_bytes: int) -> bool:
    # eager holds [B, S, H, T] fp32 scores and probabilities (and their gradients with backward)
    need = seq * seq * H * per_entry_bytes * (2 if backward else 1)
    return need < 0.8 * torch.cuda.get_device_properties(0).total_memory


def run_case(title, make, seqs, dsgraph_fns, eager_bytes, rows, slow_seqs=()):
    """Rows for one table: eager, plain compile, then each dsgraph variant, fwd and fwd+bwd. Variants
    named in ``SLOW_VARIANTS`` (seconds a call at 32k) run only at ``slow_seqs``."""
    for seq in seqs:
        for backward in (False, True):
            fn, inputs = make(seq, backward)
            results = []
            if eager_fits(seq, backward, eager_bytes):
                results.append((measure(fn, inputs, backward), peak_gib(fn, inputs, backward)))
                compiled = torch.compile(fn)
                results.append((measure(compiled, inputs, backward), peak_gib(compiled, inputs, backward)))
                torch._dynamo.reset()
            else:
                print(f"{title} S={seq} {'fwd+bwd' if backward else 'fwd'}: eager and torch.compile skipped, "
                      f"[B,S,H,T] fp32 needs ~{seq * seq * H * eager_bytes / 2 ** 30:.0f} GiB", flush=True)
                results += [(None, None), (None, None)]
            notes = []
            for name, policy in dsgraph_fns:
                if name in SLOW_VARIANTS and seq not in slow_seqs:
                    results.append((None, None))
                    notes.append(f"{name}: not run at S={seq} (--reference-seqs)")
                    continue
                opt = dsgraph.optimize(fn, policy=policy)
                try:
                    results.append((measure(opt, inputs, backward), peak_gib(opt, inputs, backward)))
                    notes.append(f"{name}: {served(opt)}")
                except Exception as exc:  # a backend that cannot serve the site: say why, keep going
                    results.append((None, None))
                    notes.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
                torch._dynamo.reset()
            times = [t for t, _ in results]
            best = min((t for t in times[2:] if t is not None), default=None)
            row = (f"| {title} | {seq} | {'fwd+bwd' if backward else 'fwd'} | "
                   + " | ".join(f"{fmt(t)} / {fmt_gib(m)}" if t is not None else "-" for t, m in results)
                   + f" | {ratio(times[0], best)} | {ratio(times[1], best)} | {tflops(seq, backward, best)} |")
            rows.append(row)
            print(row, "served:", "; ".join(notes), flush=True)
            del fn, inputs
            torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="4096,16384,32768")
    parser.add_argument("--model-seqs", default="4096,16384,32768", help="'' for none")
    parser.add_argument("--reference-seqs", default="4096",
                        help="S where the slow columns run (torch kernel, MHA-mode Triton layer)")
    args = parse_bench_args(parser)
    device = torch.device("cuda")
    seqs = [int(s) for s in args.seqs.split(",") if s]
    reference_seqs = [int(s) for s in args.reference_seqs.split(",") if s]
    bf16 = dict(device=device, dtype=torch.bfloat16)

    # --- kernel: the op alone, latent layout --------------------------------------------------
    k_header = ("| S | pass | " + " | ".join(f"{b} ms" for b in ("torch",) + BACKENDS)
                + " | best TFLOP/s (% of 989) |")
    k_rows = []
    print(k_header, flush=True)
    for seq in seqs:
        torch.manual_seed(0)
        q = torch.randn(1, seq, H, D_QK, **bf16, requires_grad=True)
        kv = torch.randn(1, seq, 1, D_QK, **bf16, requires_grad=True)
        with torch.no_grad():
            idx = torch.cat([causal_topk(torch.rand(1, len(r), seq, device=device))
                             for r in torch.arange(seq).split(1024)], dim=1)
        for backward in (False, True):
            times = []
            for backend in ("torch",) + BACKENDS:
                if backend == "torch" and seq not in reference_seqs:
                    print(f"kernel S={seq} torch: not run (--reference-seqs)", flush=True)
                    times.append(None)
                    continue

                def op(q, kv, backend=backend, idx=idx):
                    return torch.ops.dsgraph.sparse_attention(q, kv, None, idx, None, None, D_QK ** -0.5, D_V, 0, backend)[0]
                reason = dsgraph.registry.kernel("sparse_attention", backend).unsupported(
                    q, kv, None, idx, bias=None, scale=D_QK ** -0.5, d_v=D_V, upper=0)
                if reason is not None:
                    print(f"kernel S={seq} {backend}: {reason}", flush=True)
                    times.append(None)
                    continue
                try:
                    times.append(measure(op, (q, kv), backward))
                except Exception as exc:
                    print(f"kernel S={seq} {backend}: {type(exc).__name__}: {exc}", flush=True)
                    times.append(None)
            best = min((t for t in times[1:] if t is not None), default=None)
            row = (f"| {seq} | {'fwd+bwd' if backward else 'fwd'} | " + " | ".join(map(fmt, times))
                   + f" | {tflops(seq, backward, best)} |")
            k_rows.append(row)
            print(row, flush=True)
        del q, kv, idx
        torch.cuda.empty_cache()

    # --- layer: eager MLA attention as the model writes it ------------------------------------
    def make_layer(seq, backward):
        torch.manual_seed(0)
        args = [torch.randn(1, seq, H, D_NOPE, **bf16), torch.randn(1, seq, H, D_ROPE, **bf16),
                torch.randn(1, seq, 512, **bf16), torch.randn(1, seq, D_ROPE, **bf16),
                torch.randn(H * (D_NOPE + 128), 512, **bf16) * 512 ** -0.5]
        args = [a.requires_grad_(backward) for a in args] + [torch.rand(1, seq, seq, device=device)]
        return mla_layer, args

    variants = [(b, f"auto;sparse_attention={b}") for b in BACKENDS] + \
               [("triton mha", "auto;sparse_attention=triton;disable=mla_absorb")]
    header = ("| case | S | pass | eager ms / GiB | torch.compile ms / GiB | "
              + " | ".join(f"dsgraph {n} ms / GiB" for n, _ in variants)
              + " | best vs eager | best vs compile | best TFLOP/s (% of 989) |")
    rows = []
    print(header, flush=True)
    # eager: scores, probabilities (fp32) and the bf16 probabilities: ~10 bytes an entry
    run_case("layer", make_layer, seqs, variants, 10, rows, reference_seqs)

    # --- 2-layer model at released widths -----------------------------------------------------
    model_seqs = [int(s) for s in args.model_seqs.split(",") if s]
    if model_seqs:
        config = DeepseekV32Config(num_hidden_layers=2, first_k_dense_replace=2, vocab_size=8192,
                                   num_nextn_predict_layers=0)
        torch.manual_seed(0)
        model = DeepseekV32ForCausalLM(config).to(**bf16)

        def make_model(seq, backward):
            model.requires_grad_(backward)
            ids = torch.randint(0, config.vocab_size, (1, seq), device=device)
            return (lambda ids: model(ids).logits), [ids]

        # eager: the attention's scores/probabilities plus the indexer's [B, S, 64, T] fp32 logits, per layer
        run_case("2-layer model", make_model, model_seqs, variants, 16, rows,
                 reference_seqs)

    title = run_label(args.commit)
    table = "\n".join(
        markdown_table(f"Sparse MLA kernel (latent 576/512, H={H}, top-k {TOPK}, causal), {title}", k_header, k_rows)
        + [""] + markdown_table(f"DeepSeek V3.2 sparse attention layer and 2-layer model (B=1, S=T, bf16, H={H}, "
                                f"top-k {TOPK}), {title}; cells: median ms / peak GiB", header, rows))
    emit(table, args.markdown)


if __name__ == "__main__":
    main()
