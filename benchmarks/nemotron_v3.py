"""Eager vs plain torch.compile vs mamba-ssm wired by hand vs dsgraph on Nemotron V3's SSD scan, Mamba2
mixer, a 4-layer Mamba stack and one decode step (GPU).

    python benchmarks/nemotron_v3.py [--quick] [--scan-seqs 4096,16384,65536] [--seqs 4096,16384,65536]
        [--stack-seqs 4096,16384] [--no-decode] [--markdown FILE] [--commit SHA]

Widths: hidden 4096, 128 heads x 64, state 128, 8 groups, chunk 128, conv 4, bf16 weights and
activations, batch 1. "eager" is models/nemotron_v3.py with use_mamba_kernels=False (the chunked SSD in
plain torch); "mamba_ssm" is the model's use_mamba_kernels=True path (mamba_chunk_scan_combined and
rmsnorm_fn wired by hand, as NeMo's layers do); "dsgraph auto" is dsgraph.optimize(eager model) (the
passes route the scan to mamba-ssm where it can serve, the conv and gated norm to their kernels);
"dsgraph reference" forces the torch reference kernels (4k only: the CPU path's cost on a GPU). The
stack is the backbone of 4 'M' blocks (pre-norm, residual) without embeddings' and lm_head's cost that
a small vocabulary leaves. The scan rows run the SSD alone as the mixer calls it (dt = softplus(dt_raw +
dt_bias), A = -exp(A_log), per-group B and C, D skip; "mamba_ssm" = mamba_chunk_scan_combined). Decode: one step of the mixer with its conv/SSM cache, batch 32 (the model's
hand-wired path uses plain torch for S = 1 too, except mamba-ssm's rmsnorm_fn); plain torch.compile and
dsgraph also run replayed as CUDA graphs ("reduce-overhead", "auto;cudagraphs").

Times are medians of triton.testing.do_bench; fwd+bwd is out.backward(dout) after the forward (gradients
of the input and every parameter). "peak GiB" is the peak memory allocated by one step above what was
allocated before it (weights, inputs). Each case is guarded: OOM or a backend that cannot serve prints
the reason and the run goes on. Keep the case list lean: every compiled cell compiles once per shape.
"""
from __future__ import annotations

import argparse
import time

import torch
import triton
from torch._dynamo.utils import counters

import dsgraph
from attention import emit, fmt_ms, markdown_table, parse_bench_args, ratio, run_label
from dsgraph.models.nemotron_v3 import Mamba2State, NemotronV3Config, NemotronV3Model, mamba_kernels, ssd_chunked

CONFIG = dict(hidden_size=4096, mamba_num_heads=128, mamba_head_dim=64, ssm_state_size=128, n_groups=8,
              chunk_size=128, conv_kernel=4, vocab_size=1024, hybrid_override_pattern="MMMM",
              use_mamba_kernels=False)
DECODE_BATCH = 32
DECODE_DSGRAPH = {"dsgraph auto": "auto", "dsgraph auto;cudagraphs": "auto;cudagraphs"}
GIB = 1 << 30


def measure(fn, args, backward: bool):
    """(median ms, peak extra GiB) of one call (forward, or forward + backward)."""
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    dout = None

    def step():
        nonlocal dout
        if not backward:
            with torch.no_grad():
                return fn(*args)
        for a in leaves:
            a.grad = None
        out = fn(*args)
        if dout is None:
            dout = torch.randn_like(out)
        out.backward(dout)

    step()  # compile / autotune outside the timing and the memory count
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / GIB
    return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median"), peak


def guarded(name, fn, args, backward):
    """measure(), or (None, reason) where the case cannot run; frees what it allocated."""
    start = time.time()
    try:
        ms, peak = measure(fn, args, backward)
        print(f"  {name}: {ms:.2f} ms, {peak:.2f} GiB ({time.time() - start:.0f} s with compile)", flush=True)
        return ms, peak
    except torch.OutOfMemoryError:
        print(f"  {name}: OOM", flush=True)
        return None, "OOM"
    except Exception as exc:  # an unsupported backend or a compile failure: say why and go on
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
        print(f"  {name}: failed ({reason})", flush=True)
        return None, "n/a"
    finally:
        for a in args:
            if isinstance(a, torch.Tensor):
                a.grad = None
        torch.cuda.empty_cache()


def served(opt, *ops) -> str:
    report = dsgraph.explain(opt)
    return ", ".join(f"{op}: " + ("/".join(sorted({r.backend or '-' for r in report.rewrites
                                                   if r.op == op and not r.rolled_back})) or "not rewritten")
                     for op in ops)


def cell(result) -> tuple[str, str]:
    ms, peak = result
    return (fmt_ms(ms), f"{peak:.2f}") if ms is not None else (peak, "-")


def variants(module, columns):
    """(name, callable or None when skipped) per column; the eager module runs with use_mamba_kernels
    off, the wired column with it on (compiled modules trace the plain-torch path either way)."""
    mixers = [m for m in module.modules() if hasattr(m, "use_mamba_kernels")]

    def wired(*a):
        for m in mixers:
            m.use_mamba_kernels = True
        try:
            return module(*a)
        finally:
            for m in mixers:
                m.use_mamba_kernels = False
    make = {"eager": lambda: module, "torch.compile": lambda: torch.compile(module), "mamba_ssm": lambda: wired,
            "dsgraph auto": lambda: dsgraph.optimize(module, policy="auto"),
            "dsgraph reference": lambda: dsgraph.optimize(module, policy="reference")}
    return [(name, make[name]() if name in columns else None) for name in COLUMNS]


COLUMNS = ("eager", "torch.compile", "mamba_ssm", "dsgraph auto", "dsgraph reference")


def run_cases(what, make, plan, rows):
    """One row per (L, fwd / fwd+bwd, columns) of ``plan``: every column's ms and peak GiB; the forward
    rows also print each column's max error against the first column that ran."""
    for L, columns in plan:
        for backward in (False, True):
            module, x = make(L, backward)
            print(f"{what} L={L} {'fwd+bwd' if backward else 'fwd'}", flush=True)
            results, notes, ref = {}, [], None
            for name, fn in variants(module, columns):
                if fn is None:
                    results[name] = (None, "skipped")
                    continue
                call = (lambda m: (lambda t: _first(m(t))))(fn)
                results[name] = guarded(name, call, (x,), backward)
                if results[name][0] is not None and not backward:
                    with torch.no_grad():
                        out = call(x).float()
                    if ref is None:
                        ref = out
                    else:
                        err = ((out - ref).abs().max() / ref.abs().max()).item()
                        notes.append(f"{name} max error {err:.2e} of max|ref|")
                    del out
                if name.startswith("dsgraph") and results[name][0] is not None:
                    notes.append(f"{name}: {served(fn, 'ssd_scan', 'gated_rmsnorm', 'causal_conv1d')}")
                torch._dynamo.reset()
            del ref
            if notes:
                print("  " + "; ".join(notes), flush=True)
            cells = [cell(results[c]) for c in COLUMNS]
            best = results["dsgraph auto"][0]
            rows.append(f"| {what} | {L} | {'fwd+bwd' if backward else 'fwd'} | "
                        + " | ".join(f"{t} | {m}" for t, m in cells)
                        + f" | {ratio(results['eager'][0], best)} | {ratio(results['torch.compile'][0], best)} | "
                        f"{ratio(best, results['mamba_ssm'][0])} |")
            print(rows[-1], flush=True)
            del module, x
            torch.cuda.empty_cache()


class Scan(torch.nn.Module):
    """The SSD scan alone, as the mixer feeds it: x [1, L, H, P] -> y; dt = softplus(dt_raw + dt_bias),
    A = -exp(A_log), B and C per group, the D skip (the mixer's scan call without z)."""

    def __init__(self, config: NemotronV3Config, L: int):
        super().__init__()
        H, G, N = config.mamba_num_heads, config.n_groups, config.ssm_state_size
        self.chunk_size, self.use_mamba_kernels = config.chunk_size, False
        self.dt_raw = torch.nn.Parameter(torch.randn(1, L, H) - 4)
        self.dt_bias = torch.nn.Parameter(torch.zeros(H))
        self.A_log = torch.nn.Parameter(torch.rand(H).log1p())
        self.B = torch.nn.Parameter(torch.randn(1, L, G, N))
        self.C = torch.nn.Parameter(torch.randn(1, L, G, N))
        self.D = torch.nn.Parameter(torch.ones(H))

    def forward(self, x):
        A = -torch.exp(self.A_log.float())
        if self.use_mamba_kernels and not torch.compiler.is_compiling():
            return mamba_kernels().mamba_chunk_scan_combined(x, self.dt_raw, A, self.B, self.C, self.chunk_size,
                                                             D=self.D, dt_bias=self.dt_bias, dt_softplus=True)
        dt = torch.nn.functional.softplus(self.dt_raw.float() + self.dt_bias.float())
        return ssd_chunked(x, dt, A, self.B, self.C, self.chunk_size, D=self.D)[0]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def decode_row(config, device, rows):
    """One mixer decode step from a cache: eager vs plain torch.compile vs dsgraph auto (no grad), each
    compiled one also replayed as CUDA graphs (the step is launch-bound)."""
    torch.manual_seed(0)
    model = NemotronV3Model(config).to(device, torch.bfloat16)
    mixer = model.layers[0].mixer
    b, H, P, N = DECODE_BATCH, config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size
    x = torch.randn(b, 1, config.hidden_size, device=device, dtype=torch.bfloat16)
    conv = torch.randn(b, mixer.conv_dim, config.conv_kernel - 1, device=device, dtype=torch.bfloat16)
    ssm = torch.randn(b, H, P, N, device=device) * 0.1

    def step(m):
        return lambda x, conv, ssm: (lambda o: (o[0], o[1].conv, o[1].ssm))(m(x, Mamba2State(conv, ssm), True))
    print("decode step", flush=True)
    optimized = {name: dsgraph.optimize(mixer, policy=policy) for name, policy in DECODE_DSGRAPH.items()}
    columns = {"eager": mixer, "torch.compile": torch.compile(mixer),
               "torch.compile cudagraphs": torch.compile(mixer, mode="reduce-overhead"), **optimized}
    results = {}
    for name, module in columns.items():
        counters.clear()
        results[name] = guarded(name, lambda *a, fn=step(module): fn(*a)[0], (x, conv, ssm), False)
        if "cudagraphs" in name and counters["inductor"]["cudagraph_skips"]:  # replayed without graphs
            print(f"  {name}: CUDA graphs skipped {counters['inductor']['cudagraph_skips']} time(s) "
                  "(TORCH_LOGS=perf_hints says why)", flush=True)
    with torch.no_grad():
        want = step(mixer)(x, conv, ssm)
        for name, opt in optimized.items():
            if results[name][0] is None:
                continue
            print(f"  {name} served by: " + served(opt, "ssd_step", "gated_rmsnorm", "causal_conv1d",
                                                   "causal_conv1d_update"), flush=True)
            got = step(opt)(x, conv, ssm)
            rel = [((g.float() - w.float()).abs().max() / w.float().abs().max()).item() for g, w in zip(got, want)]
            print(f"  {name} vs eager (bf16 weights): y {rel[0]:.2e}, conv state {rel[1]:.2e}, ssm state "
                  f"{rel[2]:.2e} of max|eager|", flush=True)
    eager = results["eager"][0]
    best = min((results[n][0] for n in optimized if results[n][0] is not None), default=None)
    rows.append(f"| decode step, batch {b} | " + " | ".join(fmt_ms(results[n][0]) for n in columns)
                + f" | {ratio(eager, best)} |")
    print(rows[-1], flush=True)
    torch._dynamo.reset()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="4096,16384,65536")
    parser.add_argument("--quick", action="store_true", help="L = 4096 only (a smoke run)")
    parser.add_argument("--stack-seqs", default="4096,16384", help="L for the 4-layer stack rows ('' for none)")
    parser.add_argument("--scan-seqs", default="4096,16384,65536", help="L for the scan-alone rows ('' for none)")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode-step row")
    args = parse_bench_args(parser)
    device = torch.device("cuda")
    seqs = [4096] if args.quick else [int(s) for s in args.seqs.split(",") if s]
    stack_seqs = [4096] if args.quick else [int(s) for s in args.stack_seqs.split(",") if s]
    scan_seqs = [4096] if args.quick else [int(s) for s in args.scan_seqs.split(",") if s]
    # Lean (each compiled cell compiles once per shape and pass): plain torch.compile up to 16k (mixer)
    # and 4k (stack), the torch reference on the 4k mixer only.
    mixer_plan = [(L, set(COLUMNS) - ({"dsgraph reference"} if L > 4096 else set())
                   - ({"torch.compile"} if L > 16384 else set())) for L in seqs]
    scan_plan = [(L, set(COLUMNS) - ({"dsgraph reference"} if L > 4096 else set())
                  - ({"torch.compile"} if L > 16384 else set())) for L in scan_seqs]
    stack_plan = [(L, set(COLUMNS) - {"dsgraph reference"} - ({"torch.compile"} if L > 4096 else set()))
                  for L in stack_seqs]
    config = NemotronV3Config(**CONFIG)
    start = time.time()

    def scan(L, backward):
        torch.manual_seed(0)
        module = Scan(config, L).to(device, torch.bfloat16)
        x = torch.randn(1, L, config.mamba_num_heads, config.mamba_head_dim, device=device, dtype=torch.bfloat16,
                        requires_grad=backward)
        return module, x

    def mixer(L, backward):
        torch.manual_seed(0)
        module = NemotronV3Model(config).layers[0].mixer.to(device, torch.bfloat16)
        x = torch.randn(1, L, config.hidden_size, device=device, dtype=torch.bfloat16, requires_grad=backward)
        return module, x

    class Stack(torch.nn.Module):  # the backbone's 4 blocks on hidden states (no embedding lookup)
        def __init__(self):
            super().__init__()
            self.layers = NemotronV3Model(config).layers

        def forward(self, h):
            for layer in self.layers:
                h, _ = layer(h, None)
            return h

    def stack(L, backward):
        torch.manual_seed(0)
        module = Stack().to(device, torch.bfloat16)
        x = torch.randn(1, L, config.hidden_size, device=device, dtype=torch.bfloat16, requires_grad=backward)
        return module, x

    header = ("| case | L | pass | " + " | ".join(f"{c} ms | {c} peak GiB" for c in COLUMNS)
              + " | dsgraph vs eager | dsgraph vs compile | dsgraph / mamba_ssm time |")
    rows: list[str] = []
    run_cases("scan", scan, scan_plan, rows)
    run_cases("mixer", mixer, mixer_plan, rows)
    run_cases("4-layer stack", stack, stack_plan, rows)
    d_header = ("| decode | eager ms | torch.compile ms | torch.compile cudagraphs ms | "
                + " | ".join(f"{n} ms" for n in DECODE_DSGRAPH) + " | best dsgraph vs eager |")
    d_rows: list[str] = []
    if not args.no_decode:
        decode_row(config, device, d_rows)

    title = (f"Nemotron V3 Mamba2, {run_label(args.commit)}; hidden 4096, 128 heads x 64, state 128, 8 groups, "
             f"chunk 128, bf16, batch 1 ({time.time() - start:.0f} s)")
    table = "\n".join(markdown_table(title, header, rows) + [""] + markdown_table("", d_header, d_rows)[2:])
    emit(table, args.markdown)


if __name__ == "__main__":
    main()
