"""Sweep the Triton window-pool kernels' block configs at V4 sizes (GPU): prints us and GB/s (fwd counts
2 x kv bytes + output, bwd 4 x kv bytes + output, as .device/pool_bench.py) against 3350 GB/s (H100
HBM3), and the TileLang kernels once for comparison. Usage: python benchmarks/window_pool_sweep.py [S]"""
import itertools
import sys

import torch
from triton.testing import do_bench

from dsgraph.kernels.window_pool_triton import window_pool_triton, window_pool_triton_backward

PEAK = 3350.0
CASES = [(4, 1024, True), (128, 512, False), (4, 256, True)]  # ratio, w, overlap (last: the indexer's)
# (block_r, block_p, block_d, num_warps); None keeps the default. Bad combinations are reported, not fatal.
CONFIGS = [dict()] + [dict(block_p=p, block_d=d, num_warps=w)
                      for p, d, w in itertools.product((1, 2, 4, 8, 16), (64, 128, 256), (1, 2, 4, 8))
                      if p * d // (32 * w) in (4, 8)]
LARGE = [dict(block_r=r, block_d=d, num_warps=w) for r, d, w in itertools.product((8, 16, 32), (32, 64, 128, 256), (1, 2, 4))]
PROGRAMS = (264, 528, 2112, 4224)  # the backward's target program count, swept for its best config


def bench(fn):
    return do_bench(fn, warmup=5, rep=20)


def main(S: int = 16384) -> None:
    for ratio, w, overlap in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            kv = torch.randn(1, S, w, device="cuda", dtype=dtype)
            s, ape = torch.randn_like(kv), torch.randn(ratio, w, device="cuda")
            out = window_pool_triton(kv, s, ape, ratio, overlap, torch.float32)
            g = torch.randn_like(out)
            nb, no = kv.numel() * kv.element_size(), out.numel() * out.element_size()
            rows = []
            for cfg in CONFIGS + (LARGE if ratio > 16 else []):
                try:
                    tf = bench(lambda: window_pool_triton(kv, s, ape, ratio, overlap, torch.float32, **cfg))
                    tb = bench(lambda: window_pool_triton_backward(kv, s, ape, g, ratio, overlap, **cfg))
                except Exception as exc:  # a config the compiler rejects (registers, shared memory)
                    print(f"  {cfg}: {type(exc).__name__} {str(exc)[:120]}", flush=True)
                    continue
                rows.append((tf, tb, cfg, None))
            best = min(rows, key=lambda r: r[1])[2]
            for programs in PROGRAMS:
                tb = bench(lambda: window_pool_triton_backward(kv, s, ape, g, ratio, overlap, **best, programs=programs))
                rows.append((float("inf"), tb, best, programs))
            print(f"ratio {ratio} w {w} overlap {overlap} {dtype} S {S}: best forward / backward of {len(rows)}")
            for key, name, traffic in ((0, "fwd", 2 * nb + no), (1, "bwd", 4 * nb + no)):
                for row in sorted(rows, key=lambda r: r[key])[:5]:
                    t = row[key]
                    print(f"  {name} {t * 1e3:7.1f} us {traffic / t / 1e6:6.0f} GB/s "
                          f"{100 * traffic / t / 1e6 / PEAK:5.1f}%  {row[2] or 'default'} programs={row[3]}")
                default = next(r for r in rows if not r[2] and r[3] is None)
                print(f"  {name} default {default[key] * 1e3:.1f} us {traffic / default[key] / 1e6:.0f} GB/s")
            try:
                t1 = bench(lambda: torch.ops.dsgraph.window_pool(kv, s, ape, ratio, overlap, None, "tilelang"))
                t2 = bench(lambda: torch.ops.dsgraph.window_pool_backward(g, kv, s, ape, ratio, overlap, "tilelang"))
                print(f"  tilelang fwd {t1 * 1e3:.1f} us {(2 * nb + no) / t1 / 1e6:.0f} GB/s  "
                      f"bwd {t2 * 1e3:.1f} us {(4 * nb + no) / t2 / 1e6:.0f} GB/s", flush=True)
            except Exception as exc:
                print(f"  tilelang: {type(exc).__name__} {str(exc)[:200]}", flush=True)


if __name__ == "__main__":
    import dsgraph.ops.window_pool  # noqa: F401  (registers the ops)
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16384)
