"""Sweep the Triton Sinkhorn kernels alone (DeepSeek V4's M = 4, 20 iterations) over launch settings.

    python benchmarks/sinkhorn_sweep.py

Prints microseconds and the bandwidth they imply (forward: logits read + fp32 result written;
backward: logits and the fp32 gradient read, the logits' gradient written) against the H100's
3350 GB/s, so the defaults in dsgraph/kernels/sinkhorn_triton.py (``_config``) can be picked.
"""
import itertools

import torch
import triton

from dsgraph.kernels.sinkhorn_triton import sinkhorn_triton, sinkhorn_triton_backward

PEAK = 3350e9
M, ITERS, EPS = 4, 20, 1e-6
CONFIGS = [(None, None), (64, 2), (128, 4), (256, 4), (256, 8), (512, 8)]  # (matrices per program, num_warps)
SEGMENTS = [None, 2, 3, 6]  # backward: iterations per recomputed segment (None: about sqrt(iters))


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3


def line(what, seconds, nbytes):
    print(f"{what:<58} {seconds * 1e6:9.1f} us {nbytes / seconds / 1e9:8.0f} GB/s {nbytes / seconds / PEAK:6.1%}")


def main():
    print(torch.cuda.get_device_name(), "triton", triton.__version__)
    for n, dtype in itertools.product((65536, 1 << 20), (torch.float32, torch.bfloat16)):
        x = torch.randn(n, M, M, device="cuda").to(dtype)
        g = torch.randn(n, M, M, device="cuda")
        mat = M * M
        fwd_bytes = n * mat * (dtype.itemsize + 4)
        bwd_bytes = n * mat * (2 * dtype.itemsize + 4)
        for block, warps in CONFIGS:
            line(f"fwd N={n} {dtype} block={block} warps={warps}",
                 bench(lambda: sinkhorn_triton(x, ITERS, EPS, block=block, num_warps=warps)), fwd_bytes)
        for (block, warps), seg in itertools.product(CONFIGS, SEGMENTS):
            line(f"bwd N={n} {dtype} block={block} warps={warps} segment={seg}",
                 bench(lambda: sinkhorn_triton_backward(x, g, ITERS, EPS, block=block, num_warps=warps,
                                                        segment=seg)), bwd_bytes)


if __name__ == "__main__":
    main()
