"""GPU check of the Triton attention kernel: bf16 correctness against the torch reference, then
forward and forward+backward timings against PyTorch SDPA.

    python benchmarks/attention_kernel_check.py [--sizes 1024 4096 8192 16384] [--skip-check]

Timings are medians of ``triton.testing.do_bench``. FLOPs count the allowed (query, key) pairs:
4 * B * H * D * pairs for the forward (causal: pairs = S * T / 2, the usual convention), x2.5 for
forward+backward.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton

from dsgraph.kernels.attention_ref import attention_ref, attention_ref_backward
from dsgraph.kernels import attention_triton as kernels
from dsgraph.kernels.attention_triton import attention_triton, attention_triton_backward


def _max_rel_err(actual, expected):
    """Largest |a - e| relative to max |e| (NaN-aware: NaN patterns must agree)."""
    if actual is None:
        return 0.0
    actual, expected = actual.float(), expected.float()
    assert torch.equal(actual.isnan(), expected.isnan()), "NaN pattern differs"
    ok = expected.isfinite()
    return ((actual[ok] - expected[ok]).abs().max() / expected[ok].abs().max().clamp_min(1e-6)).item()


def _chosen():
    """The autotuner's last pick per kernel: BLOCK_M x BLOCK_N / warps / stages."""
    picks = []
    for name in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        c = getattr(kernels, name).best_config
        tile = f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}"
        picks.append(f"{name.split('_')[-2]} {tile}/{c.num_warps}/{c.num_stages}")
    return ", ".join(picks)


def check(device):
    """bf16 forward/backward of assorted sites vs the fp32-accumulating torch reference."""
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    sites = {  # name: (B, Hq, Hkv, S, T, D, Dv, kwargs)
        "causal gqa D128": (2, 8, 2, 1000, 1000, 128, 128, dict(upper=0)),
        "window 256 + sink": (1, 8, 1, 1500, 1500, 128, 128, dict(lower=-255, upper=0, sink=True)),
        "kv cache T>S, pad bias": (2, 4, 4, 300, 1100, 64, 64, dict(upper=800, bias="pad")),
        "mla D192/Dv128 causal": (1, 8, 8, 700, 700, 192, 128, dict(upper=0)),
        "full D256 + sink": (1, 4, 2, 513, 777, 256, 256, dict(sink=True)),
    }
    print(f"{'site':28s} {'out':>8s} {'lse':>8s} {'dq':>8s} {'dk':>8s} {'dv':>8s} {'dsink':>8s}")
    worst = 0.0
    for name, (b, hq, hkv, s, t, d, dv, kw) in sites.items():
        kw = dict(kw)
        kw["scale"] = d ** -0.5
        kw["sink"] = randn(hq, dtype=torch.float32) if kw.get("sink") else None
        if kw.get("bias") == "pad":
            bias = torch.zeros(b, 1, 1, t, device=device)
            bias[0, ..., -100:] = float("-inf")
            kw["bias"] = bias
        q, k, v = randn(b, s, hq, d).transpose(1, 2), randn(b, hkv, t, d), randn(b, hkv, t, dv)
        dout = randn(b, hq, s, dv)
        out, lse = attention_triton(q, k, v, **kw)
        ref_out, ref_lse = attention_ref(q, k, v, **kw)
        grads = attention_triton_backward(q, k, v, ref_out, ref_lse, dout, **kw)
        ref_grads = attention_ref_backward(q, k, v, ref_out, ref_lse, dout, **kw)
        errs = [_max_rel_err(a, e) for a, e in zip((out, lse, *grads), (ref_out, ref_lse, *ref_grads))]
        worst = max(worst, *errs)
        print(f"{name:28s} " + " ".join(f"{e:8.1e}" for e in errs))
    print(f"worst error relative to the tensor's max: {worst:.2e}")
    return worst


def bench(sizes, device):
    b, hq, hkv, d, window = 1, 32, 8, 128, 1024
    print(f"\nB={b} Hq={hq} Hkv={hkv} D={d} bf16; median ms (TFLOP/s)")
    print(f"{'S=T':>6s} {'site':22s} {'fwd':>18s} {'fwd+bwd':>18s}")
    for n in sizes:
        q = torch.randn(b, hq, n, d, device=device, dtype=torch.bfloat16)
        k = torch.randn(b, hkv, n, d, device=device, dtype=torch.bfloat16)
        v = torch.randn(b, hkv, n, d, device=device, dtype=torch.bfloat16)
        dout = torch.randn_like(q)
        sink = torch.randn(hq, device=device)
        causal_pairs = n * n / 2
        window_pairs = sum(min(i + 1, window) for i in range(n))

        def ours(**kw):
            def fwd():
                return attention_triton(q, k, v, scale=d ** -0.5, **kw)

            def fwd_bwd():
                out, lse = fwd()
                return attention_triton_backward(q, k, v, out, lse, dout, scale=d ** -0.5, **kw)
            return fwd, fwd_bwd

        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

        def sdpa_fwd():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def sdpa_fwd_bwd():
            F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=True).backward(dout)

        rows = [("triton causal", *ours(upper=0), causal_pairs),
                ("sdpa causal", sdpa_fwd, sdpa_fwd_bwd, causal_pairs),
                (f"triton win{window}+sink", *ours(lower=-(window - 1), upper=0, sink=sink), window_pairs)]
        for name, fwd, fwd_bwd, pairs in rows:
            flops = 4 * b * hq * d * pairs
            cells = []
            for fn, mult in ((fwd, 1.0), (fwd_bwd, 2.5)):
                ms = triton.testing.do_bench(fn, grad_to_none=[qg, kg, vg], return_mode="median")
                cells.append(f"{ms:8.3f} ({flops * mult / ms * 1e-9:5.0f})")
            picks = f"  [{_chosen()}]" if name.startswith("triton") else ""
            print(f"{n:6d} {name:22s} {cells[0]:>18s} {cells[1]:>18s}{picks}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    parser.add_argument("--skip-check", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    if not args.skip_check:
        check("cuda")
    bench(args.sizes, "cuda")


if __name__ == "__main__":
    main()
