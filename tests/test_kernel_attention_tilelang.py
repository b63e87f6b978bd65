"""TileLang flash attention (dsgraph/kernels/attention_tilelang.py), the ``tilelang`` backend of
``dsgraph::attention``.

On CPU: the kernels are built for sm_90a (TileLang lowering + nvcc, no GPU needed) and the Hopper
paths checked in the CUDA source; the block-skipping arithmetic (band blocks, interior blocks, band
clamping) is checked against the dense band by hypothesis; the unsupported reasons. On an H100
(``-m gpu``): forward and backward (dq, dk, dv, dsink) through the custom op against the torch
reference, with the bf16 bound of tests/test_attention_flex.py.
"""
import re
import shutil
import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsgraph.kernels.attention_ref import attention_ref, attention_ref_backward
from dsgraph.ops.masks import band_allowed
from dsgraph.policy import Policy
from dsgraph.registry import choose

tilelang = pytest.importorskip("tilelang", reason="tilelang not installed")
from dsgraph.kernels import attention_tilelang as atl  # noqa: E402

_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")


@_nvcc
@pytest.mark.parametrize("dim", [64, 128])
def test_kernels_compile_for_sm90a(dim):
    built = atl.compile_for_sm90a(dim, dim, torch.bfloat16, has_sink=True)
    assert set(built) == {"fwd", "prep", "dkdv", "dq"}
    for name in ("fwd", "dkdv", "dq"):
        src = built[name].get_kernel_source()
        assert "wgmma" in src and "tma_load" in src, name  # Hopper tensor cores and TMA, not mma.sync / ldg
        # Warp-specialised: a producer warpgroup (registers given back) feeds the consumers through mbarriers.
        assert "warpgroup_reg_dealloc" in src and "warpgroup_reg_alloc" in src and ".wait(" in src, name
    fwd = built["fwd"].get_kernel_source()
    assert "wgmma_rs" in fwd  # P stays in registers for O += P V
    assert "Sink[" in fwd  # the running max starts at the sink
    assert len(re.findall(r"condval\w* = -CUDART_INF_F", fwd)) == 1  # one masked path: interior blocks skip it


def test_configs_validate_and_pick_by_band():
    with pytest.raises(ValueError, match=r"BwdConfig.block_n=48: expected"):
        atl.BwdConfig(block_n=48)
    with pytest.raises(ValueError, match=r"FwdConfig.block_m=100: expected"):
        atl.FwdConfig(block_m=100)
    with pytest.raises(ValueError, match=r"BwdConfig.threads=64"):
        atl.BwdConfig(threads=64)
    with pytest.raises(ValueError, match=r"FwdConfig.stages=0"):
        atl.FwdConfig(stages=0)
    atl.CONFIGS[64, "window"] = marker = (atl.FwdConfig(stages=1), atl.BwdConfig(block_m=32))
    try:
        assert atl.default_configs(64, *atl.clamp_band(-1023, 0, 8192, 8192)) is marker  # window of 1024
        assert atl.default_configs(64, *atl.clamp_band(None, 0, 8192, 8192)) is atl.CONFIGS[64, "wide"]  # causal
        assert atl.default_configs(64, *atl.clamp_band(None, 0, 512, 512)) is marker  # short: a narrow band
    finally:
        atl.CONFIGS[64, "window"] = (atl.FwdConfig(), atl.BwdConfig())


@_nvcc
def test_forward_without_sink_and_fp16_compile():
    fwd = atl._fwd_kernel(128, 128, "float16", False).get_kernel_source()
    assert "Sink[" not in fwd and "half_t" in fwd and "wgmma" in fwd


def _shim():
    """The integer helpers the kernels' band arithmetic uses, on Python ints."""
    return types.SimpleNamespace(max=max, min=min, ceildiv=lambda a, b: -(-a // b),
                                 if_then_else=lambda c, a, b: a if c else b)


@given(seq=st.integers(1, 300), keys=st.integers(1, 300), block_m=st.sampled_from([64, 128]),
       block_n=st.sampled_from([64, 128]), lower=st.one_of(st.none(), st.integers(-400, 400)),
       width=st.one_of(st.none(), st.integers(0, 500)))
def test_block_skipping_covers_the_band_exactly(seq, keys, block_m, block_n, lower, width):
    """Forward/dQ (rows -> key blocks) and dK/dV (keys -> row blocks): the visited blocks are exactly
    those holding an allowed pair; blocks called interior hold only allowed, in-bounds pairs; the
    clamped band allows the same pairs as the given one."""
    upper = None if width is None else (lower or 0) + width
    allowed = band_allowed(seq, keys, lower, upper, "cpu")
    lo_c, hi_c = atl.clamp_band(lower, upper, seq, keys)
    assert torch.equal(band_allowed(seq, keys, lo_c, hi_c, "cpu"), allowed)
    assert -seq <= lo_c <= keys and -seq <= hi_c <= keys  # small: int32-safe in the kernels
    T = _shim()
    for m0 in range(0, seq, block_m):
        rows = allowed[m0:m0 + block_m]
        lo, hi = atl._band_blocks(T, m0, min(m0 + block_m, seq) - 1, lo_c, hi_c, keys, block_n)
        want = [kb for kb in range(-(-keys // block_n)) if rows[:, kb * block_n:(kb + 1) * block_n].any()]
        assert list(range(lo, hi)) == want, (m0, lo, hi)
        for kb in range(lo, hi):
            n0 = kb * block_n
            if atl._interior(m0, block_m, n0, block_n, lo_c, hi_c, keys):
                # rows past S are computed too: the predicate must hold for the whole padded block
                padded = band_allowed(m0 + block_m, n0 + block_n, lo_c, hi_c, "cpu")[m0:, n0:]
                assert padded.all() and n0 + block_n <= keys
    for n0 in range(0, keys, block_n):
        cols = allowed[:, n0:n0 + block_n]
        lo, hi = atl._band_blocks(T, n0, min(n0 + block_n, keys) - 1, -hi_c, -lo_c, seq, block_m)
        want = [mb for mb in range(-(-seq // block_m)) if cols[mb * block_m:(mb + 1) * block_m].any()]
        assert list(range(lo, hi)) == want, (n0, lo, hi)


def test_unsupported_reasons_on_cpu():
    q = torch.zeros(1, 4, 16, 128, dtype=torch.bfloat16)
    kv = torch.zeros(1, 2, 16, 128, dtype=torch.bfloat16)
    reason = atl.tilelang_unsupported_reason
    assert "CUDA" in reason(q, kv, kv, scale=0.1)
    assert "bias" in reason(q, kv, kv, scale=0.1, bias=torch.zeros(16, 16))
    assert "topk" in reason(q, kv, kv, scale=0.1, topk=torch.zeros(1, 16, 4, dtype=torch.int64))
    assert "dtype float32" in reason(q.float(), kv.float(), kv.float(), scale=0.1)
    assert "dtypes differ" in reason(q, kv.half(), kv, scale=0.1)
    assert "head dims" in reason(q[..., :96], kv[..., :96], kv[..., :96], scale=0.1)
    assert "head dims" in reason(q, kv, kv[..., :64], scale=0.1)
    assert "scale" in reason(q, kv, kv, scale=-1.0)
    with pytest.raises(ValueError, match="cannot serve"):
        atl.attention_tilelang(q, kv, kv, scale=0.1)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        atl.attention_tilelang(q[:, :3], kv, kv, scale=0.1)


def test_auto_policy_passes_over_tilelang_on_cpu():
    """In "auto" it is tried where SDPA cannot serve (a sink); on CPU it says why not and the next
    backend serves."""
    q = torch.zeros(1, 4, 16, 64, dtype=torch.bfloat16)
    kv = torch.zeros(1, 2, 16, 64, dtype=torch.bfloat16)
    site = dict(q=q, k=kv, v=kv, sink=torch.zeros(4), bias=None, topk=None, scale=0.125, lower=-7, upper=0)
    choice = choose("attention", Policy(tuning="off"), "site.py:1", **site)
    assert choice.backend != "tilelang" and "CUDA" in choice.rejected["tilelang"]


# --------------------------------------------------------------------------------------------
# GPU (H100 / sm_90)
# --------------------------------------------------------------------------------------------
def _gpu_only():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs an sm_90 GPU")


def _inputs(batch, hq, hkv, seq, keys, dim, sink, seed=0, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype)
    q, k, v = randn(batch, hq, seq, dim), randn(batch, hkv, keys, dim), randn(batch, hkv, keys, dim)
    if sink == "randn":
        sink = torch.randn(hq, device="cuda", generator=gen)
    elif sink is not None:  # ±30 on half the heads: the sink dominates or vanishes
        sink = torch.where(torch.arange(hq, device="cuda") % 2 == 0, sink, 0.0)
    return q, k, v, sink


def _op(q, k, v, sink, scale, lower, upper, dout, configs=None):
    """Through ``dsgraph::attention(..., "tilelang")`` and its autograd: (out, lse, dq, dk, dv[, dsink]);
    with ``configs`` = (FwdConfig, BwdConfig), through the kernel entry points with those tiles."""
    if configs is not None:
        band = dict(scale=scale, sink=sink, lower=lower, upper=upper)
        out, lse = atl.attention_tilelang(q, k, v, config=configs[0], **band)
        grads = atl.attention_tilelang_backward(q, k, v, out, lse, dout, config=configs[1], **band)
        return (out, lse) + tuple(g for g in grads if g is not None)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v) + ((sink,) if sink is not None else ())]
    out, lse = torch.ops.dsgraph.attention(*leaves[:3], leaves[3] if sink is not None else None, None, None,
                                           scale, lower, upper, "tilelang")
    return (out, lse) + torch.autograd.grad(out, leaves, dout)


def _check(q, k, v, sink, *, lower, upper, scale=None, bound_heads=None, configs=None):
    """Outputs and gradients within the flex test's bf16 bound: twice eager bf16 attention's own error
    against the fp32 reference plus one bf16 ulp at the tensor's magnitude (see
    tests/test_attention_flex.py). ``bound_heads``: derive eager's error on this many kv heads only
    (eager materialises [B, H, S, T] fp32 scores and their gradients)."""
    from test_attention_flex import _eager_attention_grads

    scale = scale or q.shape[-1] ** -0.5
    band = dict(scale=scale, sink=sink, lower=lower, upper=upper)
    assert atl.tilelang_unsupported_reason(q, k, v, **band) is None
    dout = torch.randn(*q.shape[:3], v.shape[-1], device="cuda", dtype=q.dtype)
    got = _op(q, k, v, sink, scale, lower, upper, dout, configs)
    ref_out, ref_lse = attention_ref(q, k, v, **band)
    torch.testing.assert_close(got[1], ref_lse, rtol=1e-5, atol=1e-3)  # fp32 sums of the same fp32 scores
    expected = (ref_out,) + tuple(g for g in attention_ref_backward(q, k, v, ref_out, ref_lse, dout, **band)
                                  if g is not None)
    group = q.shape[1] // k.shape[1]
    kvh = bound_heads or k.shape[1]
    sub = dict(band, sink=None if sink is None else sink[:kvh * group])
    eager = _eager_attention_grads(q[:, :kvh * group], k[:, :kvh], v[:, :kvh], dout[:, :kvh * group], **sub)
    eager_ref = attention_ref(q[:, :kvh * group], k[:, :kvh], v[:, :kvh], **sub)
    eager_want = (eager_ref[0],) + tuple(g for g in attention_ref_backward(
        q[:, :kvh * group], k[:, :kvh], v[:, :kvh], *eager_ref, dout[:, :kvh * group], **sub) if g is not None)
    errors = []
    for name, g, want, base, base_want in zip(("out", "dq", "dk", "dv", "dsink"), got[:1] + got[2:], expected,
                                              eager, eager_want):
        assert g.shape == want.shape and g.dtype == want.dtype, name
        err = (g.float() - want.float()).abs().max().item()
        base_err = (base.float() - base_want.float()).abs().max().item()
        ulp = torch.finfo(torch.bfloat16).eps * want.float().abs().max().item()
        errors.append((name, err, 2 * base_err + ulp))
    assert all(err <= bound for _, err, bound in errors), \
        "tilelang error vs bound (2 x eager bf16 error + 1 ulp): " + ", ".join(f"{n} {e:.3g}/{b:.3g}" for n, e, b in errors)


GPU_SITES = [  # (batch, hq, hkv, seq, keys, lower, upper, sink, dim)
    (2, 4, 4, 512, 512, None, 0, None, 128),          # causal, MHA
    (1, 8, 2, 1000, 1000, -255, 0, "randn", 128),     # window + sink, GQA 4, S not a multiple of the block
    (1, 16, 2, 300, 300, -999, 0, 30.0, 64),          # GQA 8, window longer than S, sink +30
    (1, 8, 8, 257, 257, 0, 0, -30.0, 64),             # window of 1, sink -30
    (2, 8, 2, 333, 333, None, None, None, 64),        # no mask, odd length
    (1, 8, 1, 200, 457, None, 457 - 200, "randn", 128),  # T > S: the causal band of a query chunk
    (1, 4, 2, 384, 384, -64, 64, None, 128),          # two-sided window
    (1, 4, 2, 130, 130, -1023, 0, None, 128),         # window of 1024 on a short sequence
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_SITES)
def test_matches_reference_gpu(case):
    _gpu_only()
    batch, hq, hkv, seq, keys, lower, upper, sink, dim = case
    q, k, v, sink = _inputs(batch, hq, hkv, seq, keys, dim, sink, seed=seq)
    _check(q, k, v, sink, lower=lower, upper=upper)


# Non-default tiles: every knob of both configs moved at least once (the forward ones are the sweep's
# candidates, benchmarks/attention_tilelang_sweep.py).
GPU_CONFIGS = [
    (atl.FwdConfig(stages=1), atl.BwdConfig(stages=1)),
    (atl.FwdConfig(block_n=64), atl.BwdConfig(block_m=32, stages=1)),
    (atl.FwdConfig(block_m=192, threads=384), atl.BwdConfig(block_n=64, threads=128)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("configs", GPU_CONFIGS, ids=str)
@pytest.mark.parametrize("case", [GPU_SITES[i] for i in (1, 5)])  # window + sink, T > S; both D=128 with a sink
def test_configs_match_reference_gpu(configs, case):
    _gpu_only()
    batch, hq, hkv, seq, keys, lower, upper, sink, dim = case
    q, k, v, sink = _inputs(batch, hq, hkv, seq, keys, dim, sink, seed=seq)
    _check(q, k, v, sink, lower=lower, upper=upper, configs=configs)


@pytest.mark.gpu
def test_llama_size_causal_gpu():
    """B=1, 32 query / 8 kv heads x 128, S=8192, causal (the benchmark's shape)."""
    _gpu_only()
    q, k, v, _ = _inputs(1, 32, 8, 8192, 8192, 128, None)
    _check(q, k, v, None, lower=None, upper=0, bound_heads=1)


@pytest.mark.gpu
def test_fp16_window_sink_gpu():
    _gpu_only()
    q, k, v, sink = _inputs(1, 8, 2, 700, 700, 64, "randn", dtype=torch.float16)
    band = dict(scale=0.125, sink=sink, lower=-99, upper=0)
    dout = torch.randn_like(q)
    got = _op(q, k, v, sink, 0.125, -99, 0, dout)
    ref_out, ref_lse = attention_ref(q, k, v, **band)
    expected = (ref_out, ref_lse) + attention_ref_backward(q, k, v, ref_out, ref_lse, dout, **band)
    # fp16 has 3 more mantissa bits than bf16: P and dS rounded to fp16 keep errors near 1e-3 of the scale.
    for name, g, want in zip(("out", "lse", "dq", "dk", "dv", "dsink"), got, expected):
        err = (g.float() - want.float()).abs().max().item()
        assert err <= 5e-3 * max(1.0, want.float().abs().max().item()), f"{name}: {err:.3g}"


@pytest.mark.gpu
def test_rows_without_keys_gpu():
    """upper = -130: the first 130 rows (a whole query block and two rows of the next) see no key.
    Without a sink: out NaN, lse -inf (the reference's eager-softmax semantics) and no gradient from
    them; with one: out 0, lse = sink."""
    _gpu_only()
    q, k, v, sink = _inputs(1, 4, 2, 300, 300, 64, "randn")
    dout = torch.randn_like(q)
    for s in (None, sink):
        out, lse, dq, dk, dv, *dsink = _op(q, k, v, s, 0.125, None, -130, dout)
        ref_out, ref_lse = attention_ref(q, k, v, scale=0.125, sink=s, upper=-130)
        assert torch.equal(torch.isnan(out), torch.isnan(ref_out)) and torch.equal(lse.isneginf(), ref_lse.isneginf())
        finite = ref_lse.isfinite()
        torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-5, atol=1e-3)
        if s is not None:
            assert (out[:, :, :130] == 0).all()
            torch.testing.assert_close(lse[:, :, :130], s.view(1, -1, 1).expand(1, 4, 130))
        assert (dq[:, :, :130] == 0).all()
        for g in (dq, dk, dv, *dsink):
            assert g.isfinite().all()
        ref = attention_ref_backward(q, k, v, ref_out, ref_lse, dout, scale=0.125, sink=s, upper=-130)
        for g, want in zip((dq, dk, dv), ref):
            assert (g.float() - want.float()).abs().max() <= 2e-2 * want.float().abs().max()  # bf16 P and dS


@pytest.mark.gpu
def test_unsupported_reasons_on_gpu():
    _gpu_only()
    q, k, v, _ = _inputs(1, 4, 2, 16, 16, 128, None)
    assert atl.tilelang_unsupported_reason(q, k, v, scale=0.1) is None
    assert "dtype float32" in atl.tilelang_unsupported_reason(q.float(), k.float(), v.float(), scale=0.1)


@pytest.mark.gpu
def test_empty_shapes_gpu():
    _gpu_only()
    q, k, v, sink = _inputs(1, 4, 2, 16, 16, 64, "randn")
    out, lse = atl.attention_tilelang(q, k[:, :, :0], v[:, :, :0], scale=0.1, sink=sink)
    assert (out == 0).all() and torch.equal(lse, sink.view(1, -1, 1).expand_as(lse))
    out, lse = atl.attention_tilelang(q, k[:, :, :0], v[:, :, :0], scale=0.1)
    assert out.isnan().all() and lse.isneginf().all()
    out, lse = atl.attention_tilelang(q[:, :, :0], k, v, scale=0.1)
    assert out.shape == (1, 4, 0, 64) and lse.shape == (1, 4, 0)
