"""TileLang sparse MLA kernels (dsgraph/kernels/sparse_attention_tilelang.py).

On CPU: the forward, backward and delta kernels are built for sm_90a (TileLang lowering + nvcc, no
GPU needed) for both head-dim layouts (576/512: V3.2, 512/512: V4) and the Hopper paths are checked
in the CUDA source. On an H100 (``-m gpu``): forward and backward against the torch reference
``dsgraph.kernels.sparse_attention_ref`` computed in fp32, at DeepSeek V3.2 sizes and at awkward
shapes, with and without an attention sink and a causal bound.
"""
import shutil

import pytest
import torch

from dsgraph.kernels.sparse_attention_ref import sparse_attention_ref, sparse_attention_ref_backward, valid_indices

tilelang = pytest.importorskip("tilelang", reason="tilelang not installed")
from dsgraph.kernels.sparse_attention_tilelang import (DIMS, compile_for_sm90a,  # noqa: E402
                                                       sparse_mla_bwd_tilelang, sparse_mla_fwd_tilelang,
                                                       tilelang_unsupported_reason)

D_QK, D_V = 576, 512


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("d_qk,d_v", DIMS)
def test_kernels_compile_for_sm90a(d_qk, d_v):
    built = compile_for_sm90a(d_qk, d_v)
    assert set(built) == {"fwd", "bwd", "delta"}
    fwd = built["fwd"].get_kernel_source()
    # The sink is folded into the epilogue (one load per head, log2 of the two-term normaliser), and
    # the causal bound is a runtime argument.
    assert "Sink[" in fwd and "log2f((exp2f(" in fwd and "int upper" in fwd
    # q is staged as two 256-wide halves, plus the 64-wide rope tail only where d_qk has one.
    assert ("q_t = " in fwd) == (d_qk > d_v)
    assert "wgmma" in fwd  # Hopper tensor cores, not an mma.sync fallback
    assert "warpgroup_reg_alloc" in fwd and "warpgroup_reg_dealloc" in fwd  # warp-specialised (setmaxnreg)
    # The producer gathers with zero-filling cp.async and waits for its own copies before its release
    # arrive on the buffer's mbarrier (the consumers rely on both).
    assert "cp_async_gs_conditional<16>" in fwd and "cp_async_wait<0>" in fwd
    assert fwd.count(".arrive()") >= 6 and ".wait(" in fwd
    assert fwd.count("(Out + ") == 2  # each consumer warpgroup stores its half of O
    bwd = built["bwd"].get_kernel_source()
    assert "wgmma" in bwd and "AtomicAddx4" in bwd and "int upper" in bwd
    assert ("q_t = " in bwd) == (d_qk > d_v)


def test_unsupported_reasons_on_cpu():
    q = torch.zeros(1, 4, 16, D_QK, dtype=torch.bfloat16)
    kv = torch.zeros(1, 8, 1, D_QK, dtype=torch.bfloat16)
    idx = torch.zeros(1, 4, 1, 8, dtype=torch.int32)
    assert "CUDA" in tilelang_unsupported_reason(q, kv, idx, scale=0.1, d_v=D_V)
    with pytest.raises(ValueError, match="cannot serve"):
        sparse_mla_fwd_tilelang(q, kv, idx, scale=0.1, d_v=D_V)
    with pytest.raises(ValueError, match="batch and query length"):
        sparse_mla_fwd_tilelang(q, kv, idx[:, :3], scale=0.1, d_v=D_V)


# --------------------------------------------------------------------------------------------
# GPU (H100 / sm_90)
# --------------------------------------------------------------------------------------------
def _gpu_only():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs an sm_90 GPU")


def _causal_topk(gen, batch, seq, keys, topk):
    """Distinct random keys per row among the causally valid ones (j <= s + T - S), -1 where a row
    has fewer than K (sorted order is irrelevant to the kernels)."""
    score = torch.rand(batch, seq, keys, device="cuda", generator=gen)
    rows = torch.arange(seq, device="cuda")[:, None] + keys - seq
    score = score.masked_fill(torch.arange(keys, device="cuda")[None, :] > rows, -1.0)
    k = min(topk, keys)
    vals, idx = score.topk(k, dim=-1)
    idx = idx.masked_fill(vals < 0, -1).int()
    if k < topk:
        idx = torch.cat([idx, idx.new_full((batch, seq, topk - k), -1)], dim=-1)
    return idx


def _inputs(batch, seq, keys, heads, topk, seed=0, junk=False, d_qk=D_QK):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, seq, heads, d_qk, device="cuda", generator=gen).bfloat16()
    kv = torch.randn(batch, keys, 1, d_qk, device="cuda", generator=gen).bfloat16()
    dout = torch.randn(batch, seq, heads, D_V, device="cuda", generator=gen).bfloat16()
    idx = _causal_topk(gen, batch, seq, keys, topk)
    if junk:  # -1, >= T and causally invalid entries scattered among the valid ones
        kinds = torch.randint(0, 8, idx.shape, device="cuda", generator=gen)
        idx = torch.where(kinds == 0, -1, idx)
        idx = torch.where(kinds == 1, keys + 7, idx)
        future = torch.arange(seq, device="cuda")[None, :, None] + keys - seq + 1
        idx = torch.where((kinds == 2) & (future < keys), future, idx)
        idx[:, 0] = -1  # a row without any valid key
    return q, kv, idx[:, :, None].contiguous(), dout


def _ref(q, kv, idx, dout, scale, upper, sink):
    """fp32 oracle on the bf16 values (the kernels accumulate in fp32 from bf16 operands)."""
    qf, kf = q.float(), kv.float()
    kw = dict(scale=scale, d_v=D_V, upper=upper, sink=sink)
    out, lse = sparse_attention_ref(qf, kf, None, idx[:, :, 0], **kw)
    dq, dkv, _ = sparse_attention_ref_backward(qf, kf, None, out, lse, dout.float(), idx[:, :, 0], **kw)
    return out, lse, dq, dkv


def _close(actual, expected, tol, name):
    """Max abs error relative to the tensor's max: the kernels round P / dS to bf16 before their
    second products (as FlashMLA does), so errors scale with the tensor, not element by element."""
    actual, expected = actual.float(), expected.float()
    err = (actual - expected).abs().max().item()
    ref = expected.abs().max().clamp_min(1e-6).item()
    assert err <= tol * ref, f"{name}: max error {err:.3g} > {tol} x max |ref| {ref:.3g}"


def _check(q, kv, idx, dout, upper="causal", sink=None):
    scale = q.shape[-1] ** -0.5
    out, lse = sparse_mla_fwd_tilelang(q, kv, idx, scale=scale, d_v=D_V, upper=upper, sink=sink)
    ref_upper = kv.shape[1] - q.shape[1] if upper == "causal" else upper
    ref_out, ref_lse, ref_dq, ref_dkv = _ref(q, kv, idx, dout, scale, ref_upper, sink)
    assert out.shape == (*q.shape[:3], D_V) and out.dtype == torch.bfloat16
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "rows without valid keys differ"
    finite = ref_lse.isfinite()
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-5, atol=1e-3)  # fp32 sums of fp32 scores
    # rows without valid keys: out = 0, lse = sink (-inf without one) and no gradient
    empty = ~valid_indices(idx[:, :, 0], kv.shape[1], ref_upper).any(-1)[..., None].expand_as(lse)
    assert (out[empty] == 0).all()
    if sink is not None:  # lse = sink, up to the kernel's log2 round trip
        torch.testing.assert_close(lse[empty], sink.float().expand_as(lse)[empty])
    _close(out, ref_out, 1e-2, "out")
    dq, dkv = sparse_mla_bwd_tilelang(q, kv, out, dout, idx, lse, scale=scale, d_v=D_V, upper=upper)
    assert dq.shape == q.shape and dq.dtype == torch.bfloat16
    assert dkv.shape == kv.shape and dkv.dtype == torch.float32
    assert (dq[empty] == 0).all()
    _close(dq, ref_dq, 2e-2, "dq")
    _close(dkv, ref_dkv, 2e-2, "dkv")


@pytest.mark.gpu
def test_deepseek_v32_size():
    _gpu_only()
    _check(*_inputs(1, 4096, 4096, 128, 2048))


@pytest.mark.gpu
@pytest.mark.parametrize("batch,seq,keys,heads,topk,junk", [
    (2, 300, 300, 16, 100, True),     # H < 64 (padded), K not a multiple of any block, junk entries
    (1, 200, 333, 100, 512, True),    # T > S (offset causal bound), H = 64 + 36, T < K
    (1, 257, 257, 128, 1000, False),  # T < K: most slots of the early rows are -1
    (2, 64, 4096, 64, 2048, False),   # decode-like: few queries over a long cache
])
def test_awkward_shapes(batch, seq, keys, heads, topk, junk):
    _gpu_only()
    _check(*_inputs(batch, seq, keys, heads, topk, seed=batch + heads, junk=junk))


@pytest.mark.gpu
@pytest.mark.parametrize("d_qk", [D_QK, D_V])
@pytest.mark.parametrize("upper", ["causal", None, 3])
def test_sink(d_qk, upper):
    """Per-head sinks (+-30 among them: all / none of the mass), rows without keys (lse = sink),
    both head-dim layouts, the causal band, no bound and a custom one; H = 100 pads a head block."""
    _gpu_only()
    q, kv, idx, dout = _inputs(2, 200, 333, 100, 300, seed=d_qk, junk=True, d_qk=d_qk)
    gen = torch.Generator(device="cuda").manual_seed(1)
    sink = torch.randn(100, device="cuda", generator=gen) * 3
    sink[:4] = torch.tensor([30.0, -30.0, 30.0, -30.0])
    _check(q, kv, idx, dout, upper=upper, sink=sink.bfloat16() if upper is None else sink)


@pytest.mark.gpu
def test_views_and_int64_indices():
    _gpu_only()
    q, kv, idx, dout = _inputs(1, 128, 256, 64, 192, junk=True)
    flat = torch.empty(kv.numel() + 1, dtype=kv.dtype, device="cuda")
    kv_odd = flat[1:].view(kv.shape).copy_(kv)  # 2-byte offset: cp.async needs 16-byte aligned rows
    idx64 = idx.long()
    idx64[..., -1] = 1 << 40  # past T and past int32: still skipped
    out, lse = sparse_mla_fwd_tilelang(q, kv_odd, idx64, scale=0.05, d_v=D_V)
    idx[..., -1] = -1
    ref_out, ref_lse = sparse_mla_fwd_tilelang(q, kv, idx, scale=0.05, d_v=D_V)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


@pytest.mark.gpu
def test_rows_past_65535():
    """S = 65600 rows x 2 head blocks (H = 80): rows and head blocks share the grid's x dimension (its y
    and z stop at 65535). Each row's result is its own: the last and first rows equal a call on them alone."""
    _gpu_only()
    seq, heads, topk = 65600, 80, 16
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, seq, heads, D_V, device="cuda", generator=gen).bfloat16()
    kv = torch.randn(1, seq, 1, D_V, device="cuda", generator=gen).bfloat16()
    dout = torch.randn(1, seq, heads, D_V, device="cuda", generator=gen).bfloat16()
    band = torch.arange(seq, device="cuda")[:, None] - torch.arange(topk, device="cuda")
    idx = band.masked_fill(band < 0, -1).int()[None, :, None]
    out, lse = sparse_mla_fwd_tilelang(q, kv, idx, scale=0.05, d_v=D_V, upper=None)
    dq, _ = sparse_mla_bwd_tilelang(q, kv, out, dout, idx, lse, scale=0.05, d_v=D_V, upper=None)
    for rows in (slice(seq - 100, seq), slice(0, 100)):
        part_out, part_lse = sparse_mla_fwd_tilelang(q[:, rows], kv, idx[:, rows], scale=0.05, d_v=D_V, upper=None)
        part_dq, _ = sparse_mla_bwd_tilelang(q[:, rows], kv, part_out, dout[:, rows], idx[:, rows], part_lse,
                                             scale=0.05, d_v=D_V, upper=None)
        assert torch.equal(out[:, rows], part_out) and torch.equal(lse[:, rows], part_lse)
        assert torch.equal(dq[:, rows], part_dq)
    assert lse.isfinite().all() and out.abs().amax() > 0


@pytest.mark.gpu
def test_no_keys_at_all():
    _gpu_only()
    q, kv, idx, dout = _inputs(1, 16, 16, 64, 8)
    for keys in (idx.new_full(idx.shape, -1), idx[..., :0]):
        out, lse = sparse_mla_fwd_tilelang(q, kv, keys, scale=0.1, d_v=D_V)
        assert (out == 0).all() and torch.isneginf(lse).all()
        dq, dkv = sparse_mla_bwd_tilelang(q, kv, out, dout, keys, lse, scale=0.1, d_v=D_V)
        assert (dq == 0).all() and (dkv == 0).all()


@pytest.mark.gpu
def test_unsupported_reasons_on_gpu():
    _gpu_only()
    q, kv, idx, _ = _inputs(1, 8, 16, 16, 8)
    assert tilelang_unsupported_reason(q, kv, idx, scale=0.1, d_v=D_V) is None
    assert "dtype" in tilelang_unsupported_reason(q.half(), kv.half(), idx, scale=0.1, d_v=D_V)
    assert "dims" in tilelang_unsupported_reason(q[..., :192], kv[..., :192], idx, scale=0.1, d_v=128)
    assert "kv heads" in tilelang_unsupported_reason(q, kv.expand(-1, -1, 2, -1), idx, scale=0.1, d_v=D_V)
    assert "scale" in tilelang_unsupported_reason(q, kv, idx, scale=-1.0, d_v=D_V)
    assert "indices dtype" in tilelang_unsupported_reason(q, kv, idx.float(), scale=0.1, d_v=D_V)
