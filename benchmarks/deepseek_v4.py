"""Eager vs plain torch.compile vs dsgraph on DeepSeek V4: each attention layer type, the Compressor's
window pool, the Hyper-Connections' Sinkhorn and a 3-layer model (GPU; ``--device cpu --tiny`` smoke-runs it).

    python benchmarks/deepseek_v4.py [--cases sliding,ratio4,ratio128,pool,sinkhorn,model]
        [--seqs 4096,16384,65536] [--model-seqs 4096,16384] [--sinkhorn-tokens 65536,1048576]
        [--passes fwd,fwdbwd] [--skip-eager-above 4096] [--deadline-s 420] [--commit SHA] [--markdown FILE]
    python benchmarks/deepseek_v4.py --device cpu --tiny      # tiny widths, S = 256: does it run?

The whole table in three calls (paste their tables together):
    python benchmarks/deepseek_v4.py --cases sliding,ratio4,ratio128 --seqs 4096
    python benchmarks/deepseek_v4.py --cases sliding,ratio4,ratio128,sinkhorn --seqs 16384,65536
    python benchmarks/deepseek_v4.py --cases pool,model
Each call starts no cell after ``--deadline-s`` seconds (a cell, compile included, can take minutes)
and still prints its tables, naming the cells it did not reach; the progress lines (flushed, with
each cell's time and the seconds since the start) show every finished cell of a killed run.

Widths (V4-Flash): hidden 4096, 64 heads x 512 (RoPE on the last 64), one shared K = V head, q_lora
1024, o_lora 1024 in 8 groups, window 128, indexer 64 heads x 128 with top-512; B = 1, bf16 weights and
activations (the Compressor and the Hyper-Connections compute in fp32, as the model does). Per layer
type: ``DeepseekV4Attention`` of models/deepseek_v4.py alone (sliding = window only; ratio4 = window +
pooled keys of 4-token overlapping windows narrowed by the Indexer to the top 512; ratio128 = window +
every visible pooled key of 128-token windows), input [1, S, 4096] and the layer's RoPE table.
Model: ``DeepseekV4ForCausalLM`` with 3 layers (one of each type, hc_mult 4, Sinkhorn 20 iterations),
its MoE shrunk to 8 routed experts (6 active per token as released, 1 shared; layer 0 hash-routed) and
an 8192-token vocabulary (the experts and the vocabulary are not the subject: 256 experts are 12 GiB a
layer); fwd = logits, fwd+bwd = logits.backward (gradients of every parameter).
Pool: the Compressor's softmax pool alone, from its fp32 projections kv, gate [1, S, w] and ape [r, w]
(ratio 4: w = 2 x 512, overlapping windows; ratio 128: w = 512) to [1, S/r, 512]. Sinkhorn: the
Hyper-Connection's 20-iteration normalisation of [T, 4, 4] fp32 logits (T tokens: one site of a layer).

Columns: eager; plain ``torch.compile``; ``dsgraph.optimize`` (policy "auto"), whose rewrites are listed.
The pool and Sinkhorn dsgraph columns report a time only where the pass rewrote the eager pattern into
``dsgraph::window_pool`` / ``dsgraph::sinkhorn`` in every graph (else "not rewritten"); the pool rows are
skipped while ``torch.ops.dsgraph.window_pool`` does not exist. ``--skip-eager-above S``: eager and plain
torch.compile hold [1, 64, S, T] fp32 scores (5 GiB at S = 4096, 80 GiB at 16384): above S they are
not run. A cell that runs out of memory says "OOM".

Cells: median ms over 3 to 50 calls timed with CUDA events after 1 to 10 warm-up calls (each timed
call after a 256 MiB write that evicts L2; no CUDA graphs; compile and autotuning happen in an
untimed first call) / peak GiB allocated during one call above what was allocated before it.
Attention core TFLOP/s counts the keys each query actually sees: query i (0-based) sees
    n(i) = min(i + 1, 128) window keys + (ratio4: min(512, (i + 1) // 4); ratio128: (i + 1) // 128)
pooled keys, and FLOPs = 4 * B * H * D * sum_i n(i) (q.k and p.v, 2 * D each per query, key and head;
D = 512 for both, K = V), x3.5 for fwd+bwd; divided by the whole module's time (projections, pooling
and the indexer included), so it is a lower bound for the attention kernel, against 989 TFLOP/s (H100
SXM dense bf16). GB/s counts one read of each input and one write of each output forward, and for
fwd+bwd that plus a read of the inputs and the output gradient and a write of the input gradients
(pool: 3 x |kv, gate| + 2 x |out|; Sinkhorn: 5 x |logits|), against 3350 GB/s (H100 SXM HBM3).
"""
from __future__ import annotations

import argparse
import importlib
import time

import torch

import dsgraph
from _harness import free, markdown_table, emit, measure, parse_bench_args, ratio, run_label
from dsgraph.models import DeepseekV4Config, DeepseekV4ForCausalLM, overlap_transform, sinkhorn_normalize
from dsgraph.models.common import rope_freqs_cis

H100_BF16_PEAK = 989.0  # TFLOP/s, dense bf16 (SXM datasheet)
H100_HBM_PEAK = 3350.0  # GB/s, HBM3 (SXM datasheet)
LAYERS = {"sliding": 0, "ratio4": 1, "ratio128": 2}  # case -> layer of the 3-layer model
CASES = (*LAYERS, "pool", "sinkhorn", "model")
COLUMNS = ("eager", "torch.compile", "dsgraph")
PASSES = {"fwd": False, "fwdbwd": True}
MODEL = dict(num_hidden_layers=3, compress_ratios=[0, 4, 128], n_routed_experts=8, num_hash_layers=1,
             vocab_size=8192, num_nextn_predict_layers=0)
# window 8, top-4; few experts and Sinkhorn iterations: the same graphs' shapes, a CPU compiles them sooner
TINY = dict(num_hidden_layers=3, compress_ratios=[0, 4, 128], num_hash_layers=1, n_routed_experts=2,
            num_experts_per_tok=1, hc_sinkhorn_iters=3)


class Bench:
    """Runs cells (one column, one pass) under a guard and a deadline, one column at a time."""

    def __init__(self, args, device):
        self.device, self.passes, self.start = device, args.passes, time.time()
        self.deadline_s, self.skip_eager_above = args.deadline_s, args.skip_eager_above
        self.target_ms = 20.0 if args.tiny else 1000.0
        # A CPU smoke run checks the script, not Inductor's C++ code generation (minutes of gcc on a small box).
        self.light = args.tiny and device.type == "cpu" and not args.inductor
        self.compile_options = dict(backend="aot_eager") if self.light else {}
        self.policy = "auto;residual=eager" if self.light else "auto"
        self.not_run: list[str] = []

    def factories(self, fn, seq: int = 0) -> dict:
        """{column: () -> the callable it times, or why it does not run}."""
        skip = f"skipped (S > {self.skip_eager_above})" if seq > self.skip_eager_above else None
        return {"eager": skip or (lambda: fn),
                "torch.compile": skip or (lambda: torch.compile(fn, **self.compile_options)),
                "dsgraph": lambda: dsgraph.optimize(fn, policy=self.policy)}

    def cell(self, label, fn, args, backward, leaves=()):
        """(ms, peak GiB or None) or (None, why not)."""
        if self.deadline_s and time.time() - self.start > self.deadline_s:
            self.not_run.append(label)
            return None, "not run (deadline)"
        started = time.time()
        try:
            result = measure(fn, args, backward, self.device, leaves, target_ms=self.target_ms)
        except torch.OutOfMemoryError:
            result = None, "OOM"
        except Exception as exc:  # a compile or kernel failure (or an OOM it wrapped): say why, keep going
            first = str(exc).splitlines()[0][:100] if str(exc) else ""
            result = None, "OOM" if "out of memory" in str(exc).lower() else f"failed ({type(exc).__name__}: {first})"
        free(self.device, list(args) + list(leaves))
        ms, peak = result
        shown = peak if ms is None else f"{ms:.3f} ms" + ("" if peak is None else f", {peak:.2f} GiB")
        print(f"[{time.time() - self.start:5.0f} s] {label}: {shown} ({time.time() - started:.0f} s incl. compile)",
              flush=True)
        return result

    def columns(self, label, factories, args, leaves=(), check=None):
        """{(column, pass): (ms, peak) or (None, why)} and the dsgraph column's rewrites. Dynamo is
        reset after each column. ``check(opt)`` -> None, or why the dsgraph column's time is refused
        (the rewrite it measures did not happen)."""
        results, served = {}, "-"
        for name, factory in factories.items():
            if isinstance(factory, str):
                results.update({(name, p): (None, factory) for p in self.passes})
                continue
            fn = factory()
            for pass_name in self.passes:
                result = self.cell(f"{label} {pass_name} {name}", fn, args, PASSES[pass_name], leaves)
                refused = check(fn) if check and name == "dsgraph" and result[0] is not None else None
                if refused:
                    print(f"  {label} {pass_name} dsgraph: {refused}; its time is not reported\n"
                          f"{dsgraph.explain(fn)}", flush=True)
                    result = None, "not rewritten"
                results[name, pass_name] = result
            if name == "dsgraph" and any(results[name, p][0] is not None for p in self.passes):
                served, skipped = rewrites_of(fn)
                print(f"  {label} dsgraph rewrites: {served}" + "".join(f"; left alone: {s}" for s in skipped),
                      flush=True)
            del fn
            torch._dynamo.reset()
            free(self.device)
        return results, served


def rewrites_of(opt) -> tuple[str, list[str]]:
    """The applied rewrites as op:backend (one entry per op and backend) and why sites were left alone."""
    report = dsgraph.explain(opt)
    done = sorted({f"{r.op}:{r.backend}" if r.backend and r.backend != "-" else r.op
                   for r in report.rewrites if not r.rolled_back and not r.replaced_by})
    return ", ".join(done) or "none", sorted({s.reason for s in report.skipped})


def rewritten(op: str):
    """A check for Bench.columns, run after each pass: the newest graph holds an applied ``op`` rewrite."""
    def check(opt):
        report = dsgraph.explain(opt)
        if not any(r.op == op and r.graph == report.graphs and not r.rolled_back and not r.replaced_by
                   for r in report.rewrites):
            return f"dsgraph::{op} not in graph {report.graphs}"
        return None
    return check


def cell_text(result) -> str:
    ms, peak = result
    if ms is None:
        return peak
    return f"{ms:.2f}" + (f" / {peak:.1f}" if peak is not None else "")


def ms_text(result) -> str:
    return result[1] if result[0] is None else f"{result[0]:.3f}"


def rate(work: float, ms, peak: float, unit: float) -> str:
    """work / ms in ``unit`` (1e9: TFLOP/s from FLOPs, 1e6: GB/s from bytes) and its share of ``peak``."""
    if ms is None:
        return "-"
    r = work / ms / unit
    return f"{r:.0f} ({r / peak:.0%})" if r >= 10 else f"{r:.2g} ({r / peak:.2%})"


def core_flops(config: DeepseekV4Config, ratio_: int, seq: int) -> float:
    """Forward FLOPs of the attention core from the keys each query sees (see the module docstring)."""
    i1 = torch.arange(1, seq + 1, dtype=torch.float64)  # i + 1
    seen = i1.clamp(max=config.sliding_window)
    if ratio_ == 4:
        seen += (i1 // 4).clamp(max=config.index_topk)
    elif ratio_:
        seen += i1 // ratio_
    return 4 * config.num_attention_heads * config.head_dim * float(seen.sum())


def window_pool(kv, gate, ape):
    """The Compressor's pool as models/deepseek_v4.py writes it: fp32 kv, gate [B, S, w], ape [r, w]
    -> [B, S // r, d] (r = 4: overlapping windows, w = 2d)."""
    r = ape.shape[0]
    P = kv.shape[1] // r
    kv = kv.unflatten(1, (P, r))
    score = gate.unflatten(1, (P, r)) + ape.float()
    if r == 4:
        kv, score = overlap_transform(kv, 0.0), overlap_transform(score, float("-inf"))
    return (kv * score.softmax(dim=2)).sum(dim=2)


def start_table(header: str) -> list[str]:
    """The rows of a table about to be filled; its header printed first, so a killed run's rows paste."""
    print(header, flush=True)
    return []


def attention_rows(bench: Bench, model, config, cases, seqs) -> list[str]:
    header = ("| layer | S | pass | eager ms / GiB | torch.compile ms / GiB | dsgraph ms / GiB | dsgraph vs eager "
              "| dsgraph vs compile | dsgraph core TFLOP/s (% of 989) | dsgraph rewrites |")
    rows = start_table(header)
    device, dtype = bench.device, next(model.parameters()).dtype
    for case in cases:
        attn = model.layers[LAYERS[case]].attn
        for seq in seqs:
            torch.manual_seed(0)
            x = torch.randn(1, seq, config.hidden_size, device=device, dtype=dtype)
            x.requires_grad_("fwdbwd" in bench.passes)
            freqs = rope_freqs_cis(config.inv_freq(bool(attn.compress_ratio), device), torch.arange(seq, device=device))
            results, served = bench.columns(f"{case} S={seq}", bench.factories(attn, seq), (x, freqs),
                                            leaves=list(attn.parameters()))
            flops = core_flops(config, attn.compress_ratio, seq)
            for pass_name in bench.passes:
                eager, comp, ds = (results[c, pass_name] for c in COLUMNS)
                work = flops * (3.5 if PASSES[pass_name] else 1.0)
                rows.append(f"| {case} | {seq} | {pass_name} | {cell_text(eager)} | {cell_text(comp)} | "
                            f"{cell_text(ds)} | {ratio(eager[0], ds[0])} | {ratio(comp[0], ds[0])} | "
                            f"{rate(work, ds[0], H100_BF16_PEAK, 1e9)} | {served} |")
                print(rows[-1], flush=True)
            del x, freqs
    title = (f"DeepSeek V4 attention layer (hidden {config.hidden_size}, {config.num_attention_heads} heads x "
             f"{config.head_dim}, q/o lora {config.q_lora_rank}/{config.o_lora_rank}, window {config.sliding_window}, "
             f"indexer {config.index_n_heads} x {config.index_head_dim} top-{config.index_topk}), B=1, bf16; cells: "
             "median ms / peak GiB")
    return markdown_table(title, header, rows)


def bandwidth_rows(bench: Bench, config, cases, seqs, tokens) -> list[str]:
    header = ("| case | size | pass | eager ms | eager GB/s | torch.compile ms | torch.compile GB/s | dsgraph ms "
              "| dsgraph GB/s (% of 3350) | dsgraph vs eager | dsgraph vs compile |")
    rows = start_table(header)
    device, grad = bench.device, "fwdbwd" in bench.passes

    def add(case, size, fn, inputs, bytes_of, op):
        results, _ = bench.columns(f"{case} {size}", bench.factories(fn), inputs, check=rewritten(op))
        for pass_name in bench.passes:
            eager, comp, ds = (results[c, pass_name] for c in COLUMNS)
            moved = bytes_of(PASSES[pass_name])
            gbs = lambda r: "-" if r[0] is None else f"{moved / r[0] / 1e6:.0f}"  # noqa: E731
            rows.append(f"| {case} | {size} | {pass_name} | {ms_text(eager)} | {gbs(eager)} | {ms_text(comp)} | "
                        f"{gbs(comp)} | {ms_text(ds)} | {rate(moved, ds[0], H100_HBM_PEAK, 1e6)} | "
                        f"{ratio(eager[0], ds[0])} | {ratio(comp[0], ds[0])} |")
            print(rows[-1], flush=True)

    if "pool" in cases:
        try:
            importlib.import_module("dsgraph.ops.window_pool")
            why = None if hasattr(torch.ops.dsgraph, "window_pool") else "not registered"
        except Exception as exc:  # not written yet, or a change in progress that does not import
            why = f"{type(exc).__name__}: {exc}"
        if why:
            print(f"pool rows skipped: dsgraph::window_pool missing ({why})", flush=True)
        for r in (4, 128) if why is None else ():
            d = config.head_dim
            w = 2 * d if r == 4 else d
            for seq in seqs:
                torch.manual_seed(0)
                inputs = [torch.randn(1, seq, w, device=device).requires_grad_(grad),                  # kv
                          torch.randn(1, seq, w, device=device).requires_grad_(grad),                  # gate
                          (torch.randn(r, w, device=device) * 0.1).requires_grad_(grad)]               # ape
                io = 4 * 2 * seq * w, 4 * (seq // r) * d  # fp32 inputs, output

                def pool_bytes(backward, io=io):
                    return 3 * io[0] + 2 * io[1] if backward else io[0] + io[1]
                add("pool", f"ratio {r}, S={seq}, w={w}", window_pool, inputs, pool_bytes, "window_pool")
                del inputs
    if "sinkhorn" in cases:
        iters, eps, m = config.hc_sinkhorn_iters, config.hc_eps, config.hc_mult

        def hc_sinkhorn(logits):
            return sinkhorn_normalize(logits, iters, eps)
        for t in tokens:
            torch.manual_seed(0)
            logits = torch.randn(1, t, m, m, device=device).requires_grad_(grad)
            size = logits.numel() * 4
            add("sinkhorn", f"{t} x [{m}, {m}], {iters} iters", hc_sinkhorn, [logits],
                lambda backward, size=size: (5 if backward else 2) * size, "sinkhorn")
            del logits
    title = (f"DeepSeek V4 Compressor window pool (fp32, head_dim {config.head_dim}) and Hyper-Connection Sinkhorn "
             f"(fp32, eps {config.hc_eps:g}); cells: median ms; GB/s of the minimal traffic")
    return markdown_table(title, header, rows)


class Logits(torch.nn.Module):
    """The model's forward with the logits out (one module for each column to compile)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).logits


def model_rows(bench: Bench, model, config, seqs) -> list[str]:
    header = ("| model | S | pass | eager ms / GiB | torch.compile ms / GiB | dsgraph ms / GiB | dsgraph vs eager "
              "| dsgraph vs compile | dsgraph rewrites |")
    rows = start_table(header)
    logits = Logits(model)
    for seq in seqs:
        torch.manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (1, seq), device=bench.device)
        results, served = bench.columns(f"model S={seq}", bench.factories(logits, seq), (ids,),
                                        leaves=list(model.parameters()))
        for pass_name in bench.passes:
            eager, comp, ds = (results[c, pass_name] for c in COLUMNS)
            rows.append(f"| {config.num_hidden_layers} layers | {seq} | {pass_name} | {cell_text(eager)} | "
                        f"{cell_text(comp)} | {cell_text(ds)} | {ratio(eager[0], ds[0])} | {ratio(comp[0], ds[0])} | "
                        f"{served} |")
            print(rows[-1], flush=True)
        del ids
    kinds = ", ".join("sliding" if r == 0 else f"ratio {r}" + (" + indexer" if r == 4 else "")
                      for r in config.compress_ratios[:config.num_hidden_layers])
    title = (f"DeepSeek V4 {config.num_hidden_layers}-layer model ({kinds}; hc_mult "
             f"{config.hc_mult}, Sinkhorn {config.hc_sinkhorn_iters} iterations; MoE of {config.n_routed_experts} "
             f"routed experts, {config.num_experts_per_tok} active, {config.n_shared_experts} shared, "
             f"{config.num_hash_layers} hash-routed layer; vocabulary {config.vocab_size}), B=1, bf16; fwd+bwd: "
             "logits.backward; cells: median ms / peak GiB")
    return markdown_table(title, header, rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--seqs", default="4096,16384,65536", help="S of the attention-layer and pool rows")
    parser.add_argument("--model-seqs", default="4096,16384", help="S of the 3-layer model rows")
    parser.add_argument("--sinkhorn-tokens", default="65536,1048576", help="matrices of the Sinkhorn rows")
    parser.add_argument("--passes", default="fwd,fwdbwd")
    parser.add_argument("--skip-eager-above", type=int, default=4096,
                        help="largest S where eager and plain torch.compile run (their [1, 64, S, T] fp32 scores)")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="start no cell after this many seconds (default 420; --tiny: none; 0: none); "
                        "the tables still print")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true",
                        help="DeepseekV4Config.tiny() widths, S = 256, short timings: a smoke run; on a CPU the "
                        "compiled columns skip Inductor (torch.compile backend aot_eager, dsgraph residual=eager)")
    parser.add_argument("--inductor", action="store_true",
                        help="with --tiny on a CPU: compile with Inductor all the same (minutes of C++ compiles)")
    args = parse_bench_args(parser, require_cuda=False)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.exit(1, "no CUDA GPU: pass --device cpu --tiny for a smoke run\n")
    cases, args.passes = [c for c in args.cases.split(",") if c], [p for p in args.passes.split(",") if p]
    if not set(cases) <= set(CASES) or not set(args.passes) <= set(PASSES):
        parser.error(f"--cases takes {','.join(CASES)}, --passes {','.join(PASSES)}; "
                     f"got {args.cases!r}, {','.join(args.passes)!r}")
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    seqs, model_seqs, tokens = ([256], [256], [256]) if args.tiny else (
        ints(args.seqs), ints(args.model_seqs), ints(args.sinkhorn_tokens))
    if args.deadline_s is None:
        args.deadline_s = 0 if args.tiny else 420
    # Three compiled columns of one forward, each with and without gradients, for three layer objects
    # sharing DeepseekV4Attention.forward: past Dynamo's default of 8 versions per frame they would run eager.
    torch._dynamo.config.recompile_limit = 64
    bench = Bench(args, device)
    label = run_label(args.commit, device) + (
        "; smoke run: torch.compile backend aot_eager, dsgraph residual=eager" if bench.light else "")
    print(f"DeepSeek V4, {label}", flush=True)
    config = DeepseekV4Config.tiny(**TINY) if args.tiny else DeepseekV4Config(**MODEL)
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepseekV4ForCausalLM(config).to(torch.bfloat16)

    tables = []
    if any(c in LAYERS for c in cases):
        tables.append(attention_rows(bench, model, config, [c for c in cases if c in LAYERS], seqs))
    if {"pool", "sinkhorn"} & set(cases):
        tables.append(bandwidth_rows(bench, config, cases, seqs, tokens))
    if "model" in cases:
        tables.append(model_rows(bench, model, config, model_seqs))
    lines = [f"DeepSeek V4, {label} ({time.time() - bench.start:.0f} s)"]
    for table in tables:
        lines += [""] + table
    if bench.not_run:
        lines += ["", f"Not run (--deadline-s {args.deadline_s:g}): " + "; ".join(bench.not_run)]
    emit("\n".join(lines), args.markdown)


if __name__ == "__main__":
    main()
