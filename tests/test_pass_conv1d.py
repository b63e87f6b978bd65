"""The causal conv1d pass: a depthwise conv over the sequence whose kept outputs are causal (padding
K - 1 and a crop, F.pad then conv, the conv state concatenated in front), with or without bias and
the SiLU after it, is rewritten to dsgraph::causal_conv1d and computes the same forward and
backward; other convolutions are left alone. The decode form (the state in front and the window's
last K - 1 columns kept as the new state) becomes dsgraph::causal_conv1d_update, outputs and new
state as eager's, where no gradient is needed."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from dsgraph.models import NemotronV3Config
from dsgraph.models.nemotron_v3 import Mamba2State, NemotronV3Mamba2Mixer
from dsgraph.passes import CausalConv1dPass
from dsgraph.testing import assert_equivalent, assert_left_alone, assert_rewrites, rewrite

PASSES = [CausalConv1dPass()]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
aten = torch.ops.aten
UPDATE = torch.ops.dsgraph.causal_conv1d_update.default


def causal_conv(x, weight, bias, state, *, form="crop", layout="blc", act="silu"):
    """x [B, L, C] (layout "blc", transposed for the conv) or [B, C, L] ("bcl"); weight [C, 1, K].
    Returns the activation in x's layout."""
    k, channels = weight.shape[2], weight.shape[0]
    xc = x.transpose(1, 2) if layout == "blc" else x
    length = xc.shape[2]
    if form == "crop":  # nn.Conv1d(padding=K - 1)(x)[..., :L]
        y = F.conv1d(xc, weight, bias, padding=k - 1, groups=channels)[..., :length]
    elif form == "pad":
        y = F.conv1d(F.pad(xc, (k - 1, 0)), weight, bias, groups=channels)
    elif form == "state":  # decode/chunked prefill: the last K - 1 inputs of the previous call in front
        y = F.conv1d(torch.cat([state, xc], dim=-1), weight, bias, groups=channels)
    else:  # padding on both sides, the crop after the transpose back
        y = F.conv1d(xc, weight, bias, padding=k - 1, groups=channels)
    if layout == "blc":
        y = y.transpose(1, 2)
        y = y[:, :length] if form == "crop_after" else y
    elif form == "crop_after":
        y = y[:, :, :length]
    if act == "silu":
        return F.silu(y)
    return y * torch.sigmoid(y) if act == "sigmoid" else y


@st.composite
def sites(draw):
    batch, length, channels, k = draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 12)), \
        draw(st.integers(1, 5))
    style = dict(form=draw(st.sampled_from(["crop", "pad", "state", "crop_after"])),
                 layout=draw(st.sampled_from(["blc", "bcl"])), act=draw(st.sampled_from(["silu", "sigmoid", None])))
    return batch, length, channels, k, draw(st.booleans()), draw(st.sampled_from(DTYPES)), style, \
        draw(st.integers(0, 2 ** 16))


@given(sites())
def test_every_written_form_is_rewritten_and_computes_the_same(site):
    batch, length, channels, k, has_bias, dtype, style, seed = site
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, length, channels) if style["layout"] == "blc" else (batch, channels, length)
    x = torch.randn(*shape, generator=gen).to(dtype).requires_grad_()
    weight = (0.5 * torch.randn(channels, 1, k, generator=gen)).to(dtype).requires_grad_()
    bias = torch.randn(channels, generator=gen).to(dtype).requires_grad_() if has_bias else None
    state = torch.randn(batch, channels, k - 1, generator=gen).to(dtype)
    fn = lambda a, w, b, s: causal_conv(a, w, b, s, **style)  # noqa: E731
    report = assert_rewrites(fn, [x, weight, bias, state], pass_name="conv1d", passes=PASSES)
    (r,) = report.rewrites
    activation = None if style["act"] is None else "silu"
    assert f"K={k}" in r.detail and f"activation {activation}" in r.detail, report


def test_the_triton_kernel_serves_the_rewrite():
    x = torch.randn(2, 7, 10, requires_grad=True)
    weight, bias = torch.randn(10, 1, 4, requires_grad=True), torch.randn(10, requires_grad=True)
    report = assert_rewrites(lambda a, w, b: causal_conv(a, w, b, None), [x, weight, bias], pass_name="conv1d",
                             passes=PASSES, policy="triton")
    assert report.rewrites[0].backend == "triton", report


NEGATIVES = {
    "both paddings kept (not causal)": lambda x, w: F.conv1d(x, w, padding=3, groups=6),
    "centred padding": lambda x, w: F.conv1d(x, w, padding=1, groups=6)[..., :x.shape[2]],
    "crop of the last outputs": lambda x, w: F.conv1d(x, w, padding=3, groups=6)[..., -x.shape[2]:],
    "reflect padding": lambda x, w: F.conv1d(F.pad(x, (3, 0), mode="reflect"), w, groups=6),
    "strided": lambda x, w: F.conv1d(F.pad(x, (3, 0)), w, stride=2, groups=6),
    "dilated": lambda x, w: F.conv1d(F.pad(x, (6, 0)), w, dilation=2, groups=6),
    "not depthwise": lambda x, w: F.conv1d(F.pad(x, (3, 0)), w.view(3, 2, 4), groups=3),
}


@pytest.mark.parametrize("name", sorted(NEGATIVES))
def test_what_is_not_a_causal_depthwise_conv_is_left_alone(name):
    args = [torch.randn(2, 6, 9), torch.randn(6, 1, 4)]
    assert_left_alone(NEGATIVES[name], args, pass_name="conv1d", op="causal_conv1d", passes=PASSES)


def test_non_causal_outputs_are_reported_as_skipped():
    args = [torch.randn(2, 6, 9), torch.randn(6, 1, 4)]
    gm, report = rewrite(NEGATIVES["both paddings kept (not causal)"], args, passes=PASSES)
    assert any("not causal-conv positions" in s.reason for s in report.skipped), report
    assert report.count("conv1d") == 0, report
    torch.testing.assert_close(gm(*args), NEGATIVES["both paddings kept (not causal)"](*args))


@pytest.mark.parametrize("form", ["crop", "state"])
def test_verify_checks_the_rewrite(form):
    args = [torch.randn(2, 7, 5), torch.randn(5, 1, 4), torch.randn(5), torch.randn(2, 5, 3)]
    fn = lambda x, w, b, s: causal_conv(x, w, b, s, form=form)  # noqa: E731
    gm, report = rewrite(fn, args, passes=PASSES, verify=True)
    assert report.rewrites[0].verified is True and not report.rewrites[0].rolled_back, report
    torch.testing.assert_close(gm(*args), fn(*args))


@pytest.mark.parametrize("cached", [False, True])
def test_the_mamba2_mixer_conv_is_rewritten(cached):
    """Nemotron V3's _conv, both branches: nn.Conv1d with padding K - 1 cropped, and the conv state
    concatenated in front (a cache), each with the SiLU and training (the decode form is forward-only:
    with gradients the conv alone is rewritten, the skip says why); the window it returns stays eager."""
    mixer = NemotronV3Mamba2Mixer(NemotronV3Config.tiny())
    xbc = torch.randn(2, 5, mixer.conv_dim, requires_grad=True)
    if cached:
        state = torch.randn(2, mixer.conv_dim, mixer.conv_kernel - 1)
        fn = lambda x, s: mixer._conv(x, Mamba2State(s, None))  # noqa: E731
        args = [xbc, state]
    else:
        fn, args = (lambda x: mixer._conv(x, None)), [xbc]
    report = assert_rewrites(fn, args, pass_name="conv1d", passes=PASSES)
    assert [r.op for r in report.rewrites] == ["causal_conv1d"], report
    assert "activation silu" in report.rewrites[0].detail, report
    assert [("forward-only" in s.reason) for s in report.skipped] == ([True] if cached else []), report


# --- the decode form: dsgraph::causal_conv1d_update ----------------------------------------------------------
def decode_conv(x, state, weight, bias, *, cast="model", act="silu", new_state="model"):
    """The mixer's cached _conv on x [B, L, C], state [B, C, K - 1], weight [C, 1, K]: cast "model"
    rounds the state to x's dtype first (``cache.conv.to(xBC.dtype)``), "promote" leaves it to cat's
    type promotion. Returns (act(conv) [B, L, C], the window's last K - 1 columns)."""
    k, channels = weight.shape[2], weight.shape[0]
    window = torch.cat([state.to(x.dtype) if cast == "model" else state, x.transpose(1, 2)], dim=-1)
    y = F.conv1d(window, weight.to(window.dtype), None if bias is None else bias.to(window.dtype),
                 groups=channels).transpose(1, 2)
    y = F.silu(y) if act == "silu" else y * torch.sigmoid(y) if act == "sigmoid" else y
    if new_state == "model":
        return y, window[..., window.shape[-1] - (k - 1):]
    return y, window[:, :, x.shape[1]:]


@st.composite
def decode_sites(draw):
    batch, length, channels, k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4)),
                                  draw(st.integers(1, 4)))
    dtype = draw(st.sampled_from(DTYPES))
    state_dtype = draw(st.sampled_from([dtype, torch.float32]))  # bf16/fp16 x with an fp32 state
    style = dict(cast=draw(st.sampled_from(["model", "promote"])), act=draw(st.sampled_from(["silu", "sigmoid", None])),
                 new_state=draw(st.sampled_from(["model", "from L"])))
    return (batch, length, channels, k, dtype, state_dtype, draw(st.booleans()), style,
            draw(st.sampled_from(["reference", "triton"])), draw(st.integers(0, 2 ** 16)))


@given(decode_sites())
def test_decode_form_is_rewritten_to_the_update_and_computes_the_same(site):
    batch, length, channels, k, dtype, state_dtype, has_bias, style, policy, seed = site
    gen = torch.Generator().manual_seed(seed)
    args = [torch.randn(batch, length, channels, generator=gen).to(dtype),
            torch.randn(batch, channels, k - 1, generator=gen).to(state_dtype),
            (0.5 * torch.randn(channels, 1, k, generator=gen)).to(dtype),
            torch.randn(channels, generator=gen).to(dtype) if has_bias else None]
    fn = lambda x, s, w, b: decode_conv(x, s, w, b, **style)  # noqa: E731
    gm, report = rewrite(fn, args, passes=PASSES, policy=policy)
    assert [(r.op, r.backend) for r in report.rewrites] == [("causal_conv1d_update", policy.replace(
        "reference", "torch"))], report
    activation = None if style["act"] is None else "silu"
    assert "decode form" in report.rewrites[0].detail and f"activation {activation}" in report.rewrites[0].detail
    targets = {n.target for n in gm.graph.nodes}
    assert UPDATE in targets and not targets & {aten.cat.default, aten.conv1d.default}, gm.graph  # all fused
    (out, new), (want_out, want_new) = gm(*args), fn(*args)
    assert new.dtype == want_new.dtype and torch.equal(new, want_new)  # the state is copied, never computed
    assert out.dtype == want_out.dtype
    # the op rounds once; eager rounds the conv output before the SiLU
    assert_equivalent(out, want_out, "outputs")


def test_decode_form_is_verified_at_compile_time():
    args = [torch.randn(2, 1, 6), torch.randn(2, 6, 3), torch.randn(6, 1, 4), torch.randn(6)]
    fn = lambda x, s, w, b: decode_conv(x, s, w, b)  # noqa: E731
    gm, report = rewrite(fn, args, passes=PASSES, verify=True)
    (r,) = report.rewrites
    assert r.op == "causal_conv1d_update" and r.verified is True and not r.rolled_back, report
    for got, want in zip(gm(*args), fn(*args)):
        torch.testing.assert_close(got, want)


def test_decode_form_whose_new_state_is_used_before_the_conv_rewrites_the_conv_alone():
    def fn(x, s, w):
        window = torch.cat([s, x.transpose(1, 2)], dim=-1)
        scaled = 2 * window[..., x.shape[1]:]  # computed before the conv in the graph
        return F.silu(F.conv1d(window, w, groups=w.shape[0])), scaled
    args = [torch.randn(2, 1, 6), torch.randn(2, 6, 3), torch.randn(6, 1, 4)]
    gm, report = rewrite(fn, args, passes=PASSES)
    assert [r.op for r in report.rewrites] == ["causal_conv1d"], report
    assert any("used before the conv" in s.reason for s in report.skipped), report
    for got, want in zip(gm(*args), fn(*args)):
        torch.testing.assert_close(got, want)


def test_the_mamba2_mixer_decode_conv_becomes_the_update():
    """The mixer's cached _conv at decode (one token, bf16 activations, the fp32 state it is handed):
    one causal_conv1d_update yields the conv output and the new state; no gradient needed."""
    mixer = NemotronV3Mamba2Mixer(NemotronV3Config.tiny()).to(torch.bfloat16)
    args = [torch.randn(2, 1, mixer.conv_dim).to(torch.bfloat16), torch.randn(2, mixer.conv_dim, mixer.conv_kernel - 1)]
    fn = lambda x, s: mixer._conv(x, Mamba2State(s, None))  # noqa: E731
    with torch.no_grad():
        report = assert_rewrites(fn, args, pass_name="conv1d", passes=PASSES, grads=False)
    assert [r.op for r in report.rewrites] == ["causal_conv1d_update"], report
    assert "state torch.float32" in report.rewrites[0].detail, report
