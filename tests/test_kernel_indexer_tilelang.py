"""TileLang Lightning-Indexer kernels (dsgraph/kernels/indexer_tilelang.py).

On CPU: the kernels are built for sm_90a (TileLang lowering + nvcc, no GPU needed). On an H100
(``-m gpu``): scores and top-k against the torch reference ``dsgraph.kernels.indexer_ref``.
"""
import math
import shutil

import pytest
import torch

from dsgraph.kernels.indexer_ref import indexer_scores_ref

tilelang = pytest.importorskip("tilelang", reason="tilelang not installed")
from dsgraph.kernels.indexer_tilelang import (compile_for_sm90a, indexer_scores_tilelang,  # noqa: E402
                                              indexer_topk_tilelang, tilelang_unsupported_reason)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_kernels_compile_for_sm90a():
    built = compile_for_sm90a(heads=64, dim=128, dtype=torch.bfloat16, topk=256, has_bias=True)
    scores = built["scores"].get_kernel_source()
    assert "wgmma" in scores and "tma_load" in scores  # Hopper paths, not an mma.sync fallback
    assert "AtomicAddRet" in built["select"].get_kernel_source()
    assert set(built) == {"scores", "scores_band", "select"}


def test_unsupported_reasons_on_cpu():
    q, k, w = torch.zeros(1, 4, 64, 128, dtype=torch.bfloat16), torch.zeros(1, 8, 128), torch.zeros(1, 4, 64)
    assert "CUDA" in tilelang_unsupported_reason(q, k, w)


# --------------------------------------------------------------------------------------------
# GPU (H100 / sm_90)
# --------------------------------------------------------------------------------------------
def _inputs(batch, seq, keys, heads=64, dim=128, bias=None, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, seq, heads, dim, device="cuda", generator=gen).bfloat16()
    k = torch.randn(batch, keys, dim, device="cuda", generator=gen).bfloat16()
    w = torch.randn(batch, seq, heads, device="cuda", generator=gen) * heads ** -0.5
    b = None
    if bias == "padding":  # [B, 1, T]: the last keys of each batch are padding
        b = torch.zeros(batch, 1, keys, device="cuda")
        for i in range(batch):
            b[i, :, keys - 37 * (i + 1):] = -math.inf
    elif bias == "full":
        b = torch.randn(batch, seq, keys, device="cuda", generator=gen)
    return q, k, w, b


BANDS = [(None, None), (None, 0), (-99, 0), (-300, 200)]  # none, causal, short window, two-sided


def _gpu_only():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs an sm_90 GPU")


def _close_scores(out, ref):
    assert torch.equal(torch.isneginf(out), torch.isneginf(ref))
    finite = torch.isfinite(ref)
    scale = ref[finite].abs().max().clamp_min(1.0)
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-4, atol=1e-4 * scale.item())


@pytest.mark.gpu
@pytest.mark.parametrize("lower,upper", BANDS)
@pytest.mark.parametrize("shape,bias", [((1, 1024, 1024), None), ((1, 1024, 1024), "padding"),
                                        ((2, 300, 700), "full"), ((2, 515, 515), "padding")])
def test_scores_match_reference(shape, bias, lower, upper):
    _gpu_only()
    q, k, w, b = _inputs(*shape, bias=bias)
    out = indexer_scores_tilelang(q, k, w, bias=b, lower=lower, upper=upper)
    _close_scores(out, indexer_scores_ref(q, k, w, bias=b, lower=lower, upper=upper))


@pytest.mark.gpu
@pytest.mark.parametrize("lower,upper", BANDS)
@pytest.mark.parametrize("shape,bias,topk,chunk_bytes", [
    ((1, 1024, 1024), None, 256, 256 << 20),
    ((1, 1024, 1024), "padding", 256, 64 * 1024 * 4),  # 64-query chunks: the chunk loop
    ((2, 515, 700), "full", 100, 256 << 20),
    ((1, 200, 2048), None, 2048, 256 << 20),  # K = T
])
def test_topk_matches_reference(shape, bias, topk, chunk_bytes, lower, upper):
    _gpu_only()
    q, k, w, b = _inputs(*shape, bias=bias)
    values, indices = indexer_topk_tilelang(q, k, w, bias=b, lower=lower, upper=upper, topk=topk,
                                            chunk_bytes=chunk_bytes)
    scores = indexer_scores_ref(q, k, w, bias=b, lower=lower, upper=upper)
    ref_values, _ = torch.topk(scores, topk, dim=-1)
    assert values.shape == indices.shape == (*shape[:2], topk) and indices.dtype == torch.int64
    # The values are torch.topk's; each index points at its value (ties may pick other indices).
    torch.testing.assert_close(values, ref_values, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(scores.gather(-1, indices), values, rtol=1e-4, atol=1e-3)
    assert (indices.sort(dim=-1).values.diff(dim=-1) > 0).all(), "indices repeat within a row"
    assert (values[..., 1:] <= values[..., :-1]).all(), "values not sorted descending"


@pytest.mark.gpu
def test_topk_distinct_scores_give_torch_indices():
    _gpu_only()
    q, k, w, _ = _inputs(1, 256, 1024)
    values, indices = indexer_topk_tilelang(q, k, w, topk=64)
    ref_values, ref_indices = torch.topk(indexer_scores_tilelang(q, k, w), 64, dim=-1)
    assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)


@pytest.mark.gpu
def test_unaligned_views_are_served():
    _gpu_only()
    q, k, w, _ = _inputs(1, 64, 200)
    flat = torch.empty(k.numel() + 1, dtype=k.dtype, device="cuda")
    k_odd = flat[1:].view(k.shape).copy_(k)  # 2-byte offset: TMA needs 16-byte aligned bases
    _close_scores(indexer_scores_tilelang(q, k_odd, w, upper=0), indexer_scores_ref(q, k, w, upper=0))


@pytest.mark.gpu
def test_unsupported_reasons_on_gpu():
    _gpu_only()
    q, k, w, _ = _inputs(1, 8, 16)
    assert tilelang_unsupported_reason(q, k, w, topk=16) is None
    assert "dtype" in tilelang_unsupported_reason(q.float(), k.float(), w)
    assert "head dim" in tilelang_unsupported_reason(q[..., :96], k[..., :96], w)
    assert "topk" in tilelang_unsupported_reason(q, k, w, topk=1 << 14)
