"""What every benchmark shares: the command line, the run label, table formatting and (for
benchmarks timed with CUDA events rather than ``triton.testing.do_bench``) timing and peak memory.

Imported by the scripts in this folder as ``from _harness import ...`` (they run as
``python benchmarks/<name>.py``, which puts this folder on the path).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import platform
import statistics
import subprocess
import sys
import time

import torch
import triton

GIB = 1 << 30


# --- command line, label, tables ---------------------------------------------------------------
def parse_bench_args(parser: argparse.ArgumentParser, require_cuda: bool = True) -> argparse.Namespace:
    """Add the arguments every benchmark takes (``--commit``, ``--markdown``), parse, exit without a
    CUDA GPU (where ``require_cuda``), and fill ``args.commit`` from git where it was not given."""
    parser.add_argument("--commit", default=None, help="the commit measured (where the copy has no .git)")
    parser.add_argument("--markdown", default=None, help="also write the tables to this file")
    args = parser.parse_args()
    if require_cuda and not torch.cuda.is_available():
        sys.exit(f"benchmarks/{parser.prog} needs a CUDA GPU")
    args.commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                text=True).stdout.strip() or "unknown"
    return args


def run_label(commit: str, device: torch.device | None = None) -> str:
    """What a table's numbers depend on: GPU (or CPU), library versions, date, commit."""
    name = (torch.cuda.get_device_name() if device is None or device.type == "cuda"
            else f"CPU {platform.processor() or platform.machine()}")
    return (f"{name}, torch {torch.__version__}, triton {triton.__version__}, "
            f"{datetime.date.today()}, commit {commit}")


def markdown_table(title: str, header: str, rows: list[str]) -> list[str]:
    """A title line and a markdown table under it (the header gives the column count)."""
    return [title, "", header, "|" + "---|" * (header.count("|") - 1)] + rows


def emit(table: str, markdown: str | None) -> None:
    print("\n" + table, flush=True)
    if markdown:
        with open(markdown, "w") as f:
            f.write(table + "\n")


def fmt_ms(t):
    return "OOM" if t is None else f"{t:.2f}"


def fmt_gib(g):
    return "OOM" if g is None else f"{g:.1f}"


def ratio(a, b):
    return "-" if a is None or b is None else f"{a / b:.1f}x"


# --- timing and memory with CUDA events (perf_counter on a CPU) ----------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(step, device: torch.device, target_ms: float = 1000.0, max_reps: int = 50) -> float:
    """Median ms of ``step()`` (already run once: compiled, autotuned). Warm-up and repetitions are
    sized from one timed call (1 to 10 warm-ups, 3 to ``max_reps`` timed calls, about ``target_ms``
    in all). On a GPU each timed call runs after a 256 MiB write that evicts L2, between CUDA events;
    on a CPU (smoke runs) the first call and 1 to ``max_reps`` more, no warm-up."""
    if device.type != "cuda":
        def once():
            start = time.perf_counter()
            step()
            return (time.perf_counter() - start) * 1e3
        first = once()
        return statistics.median([first] + [once() for _ in range(max(1, min(max_reps, int(target_ms / first))))])
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)

    def timed(n):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            flush.zero_()
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    first = timed(1)[0]
    for _ in range(max(1, min(10, int(200 / max(first, 1e-3))))):
        step()
    return statistics.median(timed(max(3, min(max_reps, int(target_ms / max(first, 1e-3))))))


def peak_gib(step, device: torch.device):
    """Peak memory allocated by one ``step()`` above what was allocated before it, GiB (None on a CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / GIB


def make_step(fn, args, backward: bool, leaves=()):
    """One call: the forward under no_grad, or the forward and ``backward(dout)`` (dout drawn once,
    the gradients of the tensor ``args`` that need them and of ``leaves`` cleared first)."""
    grads = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad] + list(leaves)
    dout = None

    def step():
        nonlocal dout
        if not backward:
            with torch.no_grad():
                fn(*args)
            return
        for t in grads:
            t.grad = None
        out = fn(*args)
        if dout is None:
            dout = torch.randn_like(out)
        out.backward(dout)
    return step


def measure(fn, args, backward: bool, device: torch.device, leaves=(), target_ms: float = 1000.0):
    """(median ms, peak GiB) of one call; raises what the call raises (OOM included)."""
    step = make_step(fn, args, backward, leaves)
    step()  # compile / autotune outside the timing and the memory count
    synchronize(device)
    peak = peak_gib(step, device)
    return time_ms(step, device, target_ms), peak


def free(device: torch.device, tensors=()) -> None:
    """Clear the gradients of ``tensors`` and give cached memory back (after a cell, OOM or not)."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t.grad = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
