"""dsgraph quickstart: an eager transformer block -> dsgraph.optimize -> report, error, timing.

    python examples/quickstart.py [--autotune]

``--autotune``: choose each site's kernel by timing the candidates on the GPU (policy "autotune";
the report shows their times, and later runs with the default policy reuse the cached choice).

The block is written the way models are: GQA with repeat_kv, an fp32 softmax, a causal mask from
``triu`` and a padding mask from ``attention_mask``. Runs on the GPU when there is one.
"""
import argparse
import logging
import time

import torch
from torch import nn

import dsgraph


class Block(nn.Module):
    """Pre-norm attention + MLP. x [B, S, D] -> [B, S, D]."""

    def __init__(self, dim=256, n_heads=8, n_kv_heads=2):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def attention(self, x, attention_mask):
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.wkv(x).view(B, S, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        group = self.n_heads // self.n_kv_heads  # repeat_kv, as in Llama
        k = k[:, :, None].expand(B, self.n_kv_heads, group, S, self.head_dim).reshape(B, self.n_heads, S, -1)
        v = v[:, :, None].expand(B, self.n_kv_heads, group, S, self.head_dim).reshape(B, self.n_heads, S, -1)
        scores = q @ k.transpose(-2, -1) / self.head_dim ** 0.5
        causal = torch.full((S, S), float("-inf"), device=x.device).triu(1)
        padding = (1.0 - attention_mask[:, None, None, :].to(scores.dtype)) * torch.finfo(scores.dtype).min
        probs = torch.softmax(scores.float() + causal + padding, dim=-1).to(v.dtype)
        return self.wo((probs @ v).transpose(1, 2).reshape(B, S, -1))

    def forward(self, x, attention_mask):
        x = x + self.attention(self.norm1(x), attention_mask)
        return x + self.mlp(self.norm2(x))


def timed(fn, *args, repeat=5):
    fn(*args)  # warm up (and compile)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--autotune", action="store_true", help='policy "autotune" instead of "auto"')
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    B, S = (4, 2048) if device == "cuda" else (2, 256)
    torch.manual_seed(0)
    block = Block().to(device, dtype)
    x = torch.randn(B, S, 256, device=device, dtype=dtype)
    attention_mask = torch.ones(B, S, device=device)
    attention_mask[1, : S // 4] = 0  # left padding in the second sequence

    start = time.perf_counter()
    optimized = dsgraph.optimize(block, verify=True, policy="autotune" if args.autotune else "auto")
    with torch.no_grad():
        out = optimized(x, attention_mask)
        print(f"compiled in {time.perf_counter() - start:.1f} s on {device}")
        print(dsgraph.explain(optimized))
        ref = block(x, attention_mask)
        valid = attention_mask.bool()  # padded query rows attend to nothing: eager fills them arbitrarily
        print(f"max |optimized - eager| on real tokens: {(out - ref)[valid].abs().max().item():.2e}")
        print(f"eager {timed(block, x, attention_mask):.2f} ms, "
              f"dsgraph {timed(optimized, x, attention_mask):.2f} ms per call")
        if device == "cpu":
            print("(on a CPU the attention site runs dsgraph's chunked torch reference, as the report says: "
                  "the fused kernels need a GPU; benchmarks/RESULTS.md has the GPU timings)")


if __name__ == "__main__":
    main()
