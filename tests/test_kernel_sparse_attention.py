"""dsgraph::sparse_attention kernels: the torch reference against a dense float64 oracle (with and
without an attention sink: DeepSeek V4's ``sink_attention`` written out), the Triton kernels
(interpreter on CPU) against the reference, forward and backward through the op (dsink included);
argument errors and unsupported reasons; GPU tests at DeepSeek V3.2 and V4 sizes (``-m gpu``)."""
import dataclasses
from typing import Optional

import pytest
import torch
from hypothesis import given, strategies as st

import dsgraph.ops.sparse_attention  # noqa: F401  (registers the op)
from dsgraph.kernels.sparse_attention_ref import sparse_attention_ref, sparse_attention_ref_backward
from dsgraph.registry import kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: Optional[torch.Tensor]
    indices: torch.Tensor
    dout: torch.Tensor
    kw: dict


def _indices(g, B, S, T, K, upper, pad):
    """Distinct indices per row, with -1 / >= T padding and (with upper) causally invalid entries."""
    rows = []
    for _ in range(B * S):
        pool = torch.randperm(max(T + 2, K), generator=g)[:K] - (1 if pad else 0)
        rows.append(pool if pad else pool.clamp(max=T - 1) if K <= T else pool)
    return torch.stack(rows).view(B, S, K)


@st.composite
def cases(draw, dtypes=(torch.float32, torch.bfloat16), device="cpu", max_heads=6, sinks=(None, "normal", "extreme")):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    latent = draw(st.booleans())
    hkv = 1 if latent else draw(st.integers(1, 3))
    heads = hkv * draw(st.sampled_from([1, 2, 3, max_heads] if not latent else [1, 3, 16, 20]))
    B, S = draw(st.integers(1, 2)), draw(st.integers(1, 6))
    T = S + draw(st.integers(0, 4))
    K = draw(st.integers(1, T + 3))  # K > T included
    D = draw(st.sampled_from([8, 24]))
    d_v = draw(st.sampled_from([8, 16])) if not latent else draw(st.sampled_from([4, D]))
    upper = draw(st.sampled_from([None, T - S, T - S + 1, 0]))
    pad = draw(st.booleans()) or K > T
    dtype = draw(st.sampled_from(dtypes))
    idx = torch.stack([torch.randperm(max(T + 2, K), generator=g)[:K] - 1 for _ in range(B * S)]).view(B, S, K)
    if not pad:
        idx = torch.stack([torch.randperm(T, generator=g)[:min(K, T)] for _ in range(B * S)]).view(B, S, -1)
    idx = idx.to(draw(st.sampled_from([torch.int32, torch.int64])))
    q = torch.randn(B, S, heads, D, generator=g).to(dtype)
    k = torch.randn(B, T, hkv, D, generator=g).to(dtype)
    v = None if latent else torch.randn(B, T, hkv, d_v, generator=g).to(dtype)
    dout = torch.randn(B, S, heads, d_v, generator=g).to(dtype)
    bias = None
    if draw(st.booleans()):  # a gathered mask: 0, -inf (skips the entry) or finite values
        bias = torch.randn(idx.shape, generator=g)
        bias = bias.masked_fill(bias < -0.8, float("-inf")).masked_fill(bias > 0.8, 0.0).to(device)
    sink = draw(st.sampled_from(sinks))
    if sink is not None:  # per-head logits; +-30 makes the sink take all or none of the mass
        sink = torch.randn(heads, generator=g) * 2 if sink == "normal" else \
            torch.randint(0, 2, (heads,), generator=g) * 60.0 - 30.0
        sink = sink.to(device=device, dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])))
    to = dict(device=device)
    return Case(q.to(**to), k.to(**to), None if v is None else v.to(**to), idx.to(**to), dout.to(**to),
                dict(scale=D ** -0.5, d_v=d_v, upper=upper, bias=bias, sink=sink))


def dense_oracle(c: Case):
    """Membership-masked dense attention in float64 with autograd: ((out, lse, dq, dk, dv?, dsink?),
    rows with no valid entry [B, S, H]). With a sink, DeepSeek V4's ``sink_attention``: the sink
    logit is appended as a column, softmax over keys and sink, the column dropped before P V."""
    q, k = c.q.double().requires_grad_(), c.k.double().requires_grad_()
    v = None if c.v is None else c.v.double().requires_grad_()
    sink = None if c.kw["sink"] is None else c.kw["sink"].double().requires_grad_()
    B, S, H, _ = q.shape
    T, G = k.shape[1], H // k.shape[2]
    vals = k[..., :c.kw["d_v"]] if v is None else v
    s = torch.einsum("bshd,bthd->bsht", q, k.repeat_interleave(G, 2)) * c.kw["scale"]
    idx = c.indices.long().cpu()
    ok = (idx >= 0) & (idx < T)
    if c.kw["upper"] is not None:
        ok &= idx <= torch.arange(S)[None, :, None] + c.kw["upper"]
    allowed = torch.zeros(B, S, T + 1, dtype=torch.bool).scatter(-1, idx.where(ok, T), True)[..., :T]
    if c.kw["bias"] is not None:
        dense_bias = torch.zeros(B, S, T + 1, dtype=torch.float64).scatter(-1, idx.where(ok, T), c.kw["bias"].double().cpu())
        s = s + dense_bias[:, :, None, :T].to(s.device)
    s = s.masked_fill(~allowed[:, :, None].to(s.device), float("-inf"))
    empty = ~s.detach().logsumexp(-1).isfinite()
    if sink is None:
        lse = s.detach().logsumexp(-1)
        # rows with no valid entry: out 0 and no gradient (a softmax of -inf only would be NaN both ways)
        p = s.masked_fill(empty[..., None], 0.0).softmax(-1) * (~empty)[..., None]
    else:
        s = torch.cat([s, sink.view(1, 1, H, 1).expand(B, S, H, 1)], dim=-1)
        lse = s.detach().logsumexp(-1)
        p = s.softmax(-1)[..., :-1]
    out = torch.einsum("bsht,bthd->bshd", p, vals.repeat_interleave(G, 2))
    grads = torch.autograd.grad(out, [x for x in (q, k, v, sink) if x is not None], c.dout.double())
    return (out, lse, *grads), empty


def _close(actual, expected, dtype, slack=0.0):
    # bf16 inputs: probabilities/ds are rounded to bf16 for the tensor-core products (flash practice).
    tol = dict(rtol=2e-2, atol=2e-2 * max(1.0, expected.abs().max().item())) if dtype == torch.bfloat16 else \
        dict(rtol=1e-4, atol=1e-5)
    tol["atol"] += slack
    torch.testing.assert_close(actual.double(), expected.double(), **tol)


def _delta_slack(c: Case, out) -> float:
    """bf16: the kernels' delta = rowsum(dout * out) reads the bf16-rounded out (flash practice), the
    reference's rowsum(p * dp) does not. The difference, up to 2^-8 rowsum|dout * out| per row, reaches
    dq and dk through ds = p (dp - delta) scale (p <= 1, at most S rows per key). It cancels nowhere
    when a row's mass sits on one key (out ~ p v with p < 1: a sink, or few keys)."""
    if c.q.dtype != torch.bfloat16:
        return 0.0
    row = 2.0 ** -8 * (c.dout.float() * out.float()).abs().sum(-1).max().item()
    return row * c.kw["scale"] * c.q.shape[1] * max(c.q.abs().max().item(), c.k.abs().max().item())


def _tol_dtype(t, c: Case):
    """A bf16 sink's gradient is rounded to bf16 whatever the inputs' dtype."""
    return torch.bfloat16 if t.dtype == torch.bfloat16 else c.q.dtype


def _run(backend, c: Case):
    """(out, lse, dq, dk, dv?, dsink?) through the op and its autograd on ``backend``."""
    leaves = [x.detach().requires_grad_() if x is not None else None for x in (c.q, c.k, c.v, c.kw["sink"])]
    q, k, v, sink = leaves
    out, lse = torch.ops.dsgraph.sparse_attention(q, k, v, c.indices, c.kw["bias"], sink, c.kw["scale"],
                                                  c.kw["d_v"], c.kw["upper"], backend)
    grads = torch.autograd.grad(out, [x for x in leaves if x is not None], c.dout)
    return out.detach(), lse, *grads


def _rows_without_keys(c: Case, lse, out, empty):
    """No valid entry: out 0; lse = sink (exactly: logaddexp(-inf, sink)), -inf without one."""
    empty = empty.to(lse.device)
    assert not out[empty].any()
    sink = c.kw["sink"]
    want = torch.full_like(lse, float("-inf")) if sink is None else sink.float().expand_as(lse)
    assert torch.equal(lse[empty], want[empty]) and lse[~empty].isfinite().all()


@given(cases(), st.sampled_from([None, 1, 4]))
def test_reference_matches_dense_oracle(c, block_q):
    out, lse = sparse_attention_ref(c.q, c.k, c.v, c.indices, block_q=block_q, **c.kw)
    grads = sparse_attention_ref_backward(c.q, c.k, c.v, out, lse, c.dout, c.indices, block_q=block_q, **c.kw)
    want, empty = dense_oracle(c)
    assert out.dtype == c.q.dtype and lse.dtype == torch.float32
    _rows_without_keys(c, lse, out, empty)
    for got, exp in zip((out, lse, *[g for g in grads if g is not None]), want):
        _close(got.where(got.isfinite(), 0), exp.where(exp.isfinite(), 0), c.q.dtype)


@given(cases(sinks=("normal", "extreme")))
def test_op_autograd_matches_dense_oracle(c):
    """The op end to end on the reference: dsink (computed by the op from out, dout, lse) included."""
    got = _run("torch", c)
    want, empty = dense_oracle(c)
    _rows_without_keys(c, got[1], got[0], empty)
    assert len(got) == len(want)
    if c.kw["sink"] is not None:
        assert got[-1].dtype == c.kw["sink"].dtype and got[-1].shape == c.kw["sink"].shape
    for a, b in zip(got, want, strict=True):
        _close(a.where(a.isfinite(), 0), b.where(b.isfinite(), 0), _tol_dtype(a, c))


@given(cases())
def test_triton_matches_reference(c):
    want = _run("torch", c)
    slack = _delta_slack(c, want[0])
    for i, (got, exp) in enumerate(zip(_run("triton", c), want, strict=True)):
        assert got.dtype == exp.dtype and got.shape == exp.shape
        _close(got.where(got.isfinite(), 0), exp.where(exp.isfinite(), 0), _tol_dtype(got, c),
               slack if i in (2, 3) else 0.0)  # dq, dk


@pytest.mark.parametrize("heads", [2, 16])  # broadcast products / tensor-core dots
def test_triton_sink_epilogue(heads):
    """Sinks of +-30 and 0, a row without a valid key (lse = sink, out 0), K = V latent mode."""
    g = torch.Generator().manual_seed(heads)
    q, kv = torch.randn(1, 3, heads, 16, generator=g), torch.randn(1, 5, 1, 16, generator=g)
    idx = torch.tensor([[[-1, 7], [0, 1], [4, 2]]])
    sink = torch.tensor([30.0, -30.0, 0.0, 1.5] * (heads // 2))[:heads]
    c = Case(q, kv, None, idx, torch.randn(1, 3, heads, 16, generator=g),
             dict(scale=0.25, d_v=16, upper=None, bias=None, sink=sink))
    got, want = _run("triton", c), _run("torch", c)
    assert not got[0][0, 0].any()
    torch.testing.assert_close(got[1][0, 0], sink)  # lse = sink (up to the log2 round trip)
    for a, b in zip(got, want, strict=True):
        _close(a, b, torch.float32)


def test_bad_arguments_name_the_argument():
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 3, 1, 8)
    idx = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="indices must be an int32/int64 tensor"):
        torch.ops.dsgraph.sparse_attention(q, k, None, idx.float(), None, None, 1.0, 8, None, "torch")
    with pytest.raises(ValueError, match=r"d_v must be in \[1, D=8\]"):
        torch.ops.dsgraph.sparse_attention(q, k, None, idx, None, None, 1.0, 9, None, "torch")
    with pytest.raises(ValueError, match="multiple of kv heads"):
        torch.ops.dsgraph.sparse_attention(q, torch.randn(1, 3, 3, 8), None, idx, None, None, 1.0, 8, None, "torch")
    with pytest.raises(ValueError, match="bias must be float32 of the indices' shape"):
        torch.ops.dsgraph.sparse_attention(q, k, None, idx, torch.zeros(1, 2, 3), None, 1.0, 8, None, "torch")
    with pytest.raises(ValueError, match="share one dtype"):
        torch.ops.dsgraph.sparse_attention(q, k.bfloat16(), None, idx, None, None, 1.0, 8, None, "torch")
    with pytest.raises(ValueError, match=r"sink must be a floating-point tensor \[H=4\]"):
        torch.ops.dsgraph.sparse_attention(q, k, None, idx, None, torch.zeros(3), 1.0, 8, None, "torch")


def test_unsupported_reasons():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8)
    idx = torch.zeros(1, 2, 2, dtype=torch.long)
    tilelang = kernel("sparse_attention", "tilelang").unsupported
    assert "latent (MQA) layout only" in tilelang(q, k, v, idx, bias=None, scale=1.0, d_v=8, upper=1)
    assert "takes no bias" in tilelang(q, k[:, :, :1], None, idx, bias=torch.zeros(1, 2, 2), scale=1.0, d_v=8, upper=1)
    assert kernel("sparse_attention", "torch").unsupported(q, k, v, idx, bias=None, scale=1.0, d_v=8, upper=None) is None


def test_autograd_through_the_op_matches_the_oracle():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 3, 8, generator=g, requires_grad=True)
    kv = torch.randn(1, 4, 1, 8, generator=g, requires_grad=True)
    idx = torch.tensor([[[0, -1], [1, 0], [2, 5], [3, 1]]])
    dout = torch.randn(1, 4, 3, 6, generator=g)
    out, _ = torch.ops.dsgraph.sparse_attention(q, kv, None, idx, None, None, 0.5, 6, 0, "torch")
    got = torch.autograd.grad(out, [q, kv], dout)
    want, _ = dense_oracle(Case(q.detach(), kv.detach(), None, idx, dout,
                                dict(scale=0.5, d_v=6, upper=0, bias=None, sink=None)))
    for a, b in zip((out, *got), (want[0], *want[2:]), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)  # fp32 kernel vs float64 oracle


# --- GPU: DeepSeek V3.2 sizes ---------------------------------------------------------------------
def _v32_case(S=4096, T=4096, H=128, K=2048, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, S, H, 576, device="cuda", generator=g, dtype=torch.bfloat16)
    kv = torch.randn(1, T, 1, 576, device="cuda", generator=g, dtype=torch.bfloat16)
    # Top-k of random scores under the causal band (early rows have fewer than K valid keys: the rest
    # are invalid entries the kernels skip), as the indexer produces them.
    idx = torch.empty(1, S, K, dtype=torch.int32, device="cuda")
    for start in range(0, S, 512):
        rows = torch.arange(start, min(S, start + 512), device="cuda")
        scores = torch.rand(1, len(rows), T, device="cuda", generator=g)
        scores = scores.masked_fill(torch.arange(T, device="cuda")[None, None] > rows[None, :, None] + T - S, -1)
        idx[:, rows] = scores.topk(K, dim=-1)[1].int()
    dout = torch.randn(1, S, H, 512, device="cuda", generator=g, dtype=torch.bfloat16)
    return Case(q, kv, None, idx, dout, dict(scale=576 ** -0.5, d_v=512, upper=T - S, bias=None, sink=None))


def _gpu_check(backend):
    c = _v32_case()
    reason = kernel("sparse_attention", backend).unsupported(c.q, c.k, c.v, c.indices, **c.kw)
    assert reason is None, reason
    want = _run("torch", c)
    for got, exp in zip(_run(backend, c), want, strict=True):
        _close(got.where(got.isfinite(), 0), exp.where(exp.isfinite(), 0), torch.bfloat16)


@pytest.mark.gpu
def test_triton_v32_sizes_gpu():
    _gpu_check("triton")


@pytest.mark.gpu
def test_tilelang_v32_sizes_gpu():
    pytest.importorskip("tilelang")
    _gpu_check("tilelang")


# --- GPU: DeepSeek V4 sizes (K = V, one 512-wide key per position, per-head sinks) -------------------
def _v4_case(S=4096, H=64, D=512, window=128, pooled=512, ratio=4, seed=0):
    """Each query's index list as V4's fused path builds it: its causal window of local keys (-1
    before position 0), then ``pooled`` of the compressed keys (stored after the S local ones, T = S +
    S // ratio) it may see (p < (s + 1) // ratio), chosen at random, -1 where fewer exist."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    T, n_pool = S + S // ratio, S // ratio
    q = torch.randn(1, S, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    kv = torch.randn(1, T, 1, D, device="cuda", generator=g, dtype=torch.bfloat16)
    rows = torch.arange(S, device="cuda")
    local = rows[:, None] - torch.arange(window - 1, -1, -1, device="cuda")
    score = torch.rand(S, n_pool, device="cuda", generator=g)
    score = score.masked_fill(torch.arange(n_pool, device="cuda") >= ((rows + 1) // ratio)[:, None], -1.0)
    vals, chosen = score.topk(pooled, dim=-1)
    idx = torch.cat([local.clamp(min=-1), (chosen + S).masked_fill(vals < 0, -1)], dim=-1)[None].int()
    dout = torch.randn(1, S, H, D, device="cuda", generator=g, dtype=torch.bfloat16)
    sink = torch.randn(H, device="cuda", generator=g) * 2
    return Case(q, kv, None, idx, dout, dict(scale=D ** -0.5, d_v=D, upper=None, bias=None, sink=sink))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "tilelang"])
def test_v4_sizes_gpu(backend):
    """B=1, S=4096, H=64, D=d_v=512, K=640 (window 128 + 512 pooled), bf16, with sinks: out, lse,
    dq, dkv and dsink through the op against the torch reference."""
    if backend == "tilelang":
        pytest.importorskip("tilelang")
    c = _v4_case()
    reason = kernel("sparse_attention", backend).unsupported(c.q, c.k, c.v, c.indices, **c.kw)
    assert reason is None, reason
    want = _run("torch", c)
    got = _run(backend, c)
    assert len(got) == len(want) == 5  # out, lse, dq, dkv, dsink
    for a, b in zip(got, want, strict=True):
        _close(a.where(a.isfinite(), 0), b.where(b.isfinite(), 0), torch.bfloat16)


@pytest.mark.gpu
def test_triton_mha_mode_gpu():
    """Per-head keys and values (the official prefill layout), H=128, 192/128 dims."""
    g = torch.Generator(device="cuda").manual_seed(0)
    S, H, K = 2048, 128, 512
    q, k = (torch.randn(1, S, H, 192, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    v, dout = (torch.randn(1, S, H, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    idx = torch.rand(1, S, S, device="cuda", generator=g).topk(K, dim=-1)[1]
    c = Case(q, k, v, idx, dout, dict(scale=192 ** -0.5, d_v=128, upper=0, bias=None, sink=None))
    want = _run("torch", c)
    for got, exp in zip(_run("triton", c), want, strict=True):
        _close(got.where(got.isfinite(), 0), exp.where(exp.isfinite(), 0), torch.bfloat16)
