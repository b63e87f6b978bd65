"""Shared model pieces (models/common.py) against direct formulas; the checkpoint round trip every
model's tests run."""
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsgraph.models import CheckpointError
from dsgraph.models.common import (MLP, LayerNorm, MoE, MoEGate, RMSNorm, apply_rope_half, apply_rope_interleaved,
                           dequantize_fp8_blockwise, rope_freqs_cis, yarn_inv_freq, yarn_mscale)


def _angles(S, R, base=10000.0):
    inv = yarn_inv_freq(R, base)
    return torch.outer(torch.arange(S, dtype=torch.float32), inv)  # [S, R/2]


@settings(deadline=None)
@given(S=st.integers(1, 9), half=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_rope_layouts_match_rotation_formulas(S, half, seed):
    g = torch.Generator().manual_seed(seed)
    R = 2 * half
    x = torch.randn(2, S, 3, R, generator=g)
    ang = _angles(S, R)[None, :, None, :]
    cos, sin = ang.cos(), ang.sin()
    freqs = rope_freqs_cis(yarn_inv_freq(R, 10000.0), torch.arange(S))
    # Interleaved: pairs (2k, 2k+1).
    a, b = x[..., 0::2], x[..., 1::2]
    want = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    torch.testing.assert_close(apply_rope_interleaved(x, freqs), want)
    # Non-interleaved: pairs (k, k + R/2), i.e. Llama's rotate_half.
    a, b = x[..., :half], x[..., half:]
    want = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    torch.testing.assert_close(apply_rope_half(x, freqs), want)


def test_yarn_frequencies():
    plain = yarn_inv_freq(64, 10000.0)
    torch.testing.assert_close(plain, 1.0 / 10000.0 ** (torch.arange(0, 64, 2).float() / 64))
    yarn = yarn_inv_freq(64, 10000.0, factor=40, original_seq_len=4096, beta_fast=32, beta_slow=1)
    # High-frequency dims (many rotations over 4096 tokens) are kept, low-frequency ones divided by 40.
    torch.testing.assert_close(yarn[:4], plain[:4])
    torch.testing.assert_close(yarn[-4:], plain[-4:] / 40)
    assert bool(((yarn <= plain) & (yarn >= plain / 40 * (1 - 1e-6))).all())
    assert yarn_mscale(1.0) == 1.0
    assert math.isclose(yarn_mscale(40, 1.0), 0.1 * math.log(40) + 1)


def test_norms_match_formulas():
    x = torch.randn(3, 5, 16)
    rms = RMSNorm(16)
    with torch.no_grad():
        rms.weight.uniform_(0.5, 1.5)
    torch.testing.assert_close(rms(x), rms.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert rms(x.bfloat16()).dtype == torch.bfloat16
    ln = LayerNorm(16)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-1, 1)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(ln(x), (x - mu) / torch.sqrt(var + 1e-6) * ln.weight + ln.bias)


@settings(deadline=None)
@given(n_group=st.sampled_from([1, 2, 4]), topk_group=st.integers(1, 4), top_k=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_gate_group_limited_routing(n_group, topk_group, top_k, seed):
    torch.manual_seed(seed)
    topk_group = min(topk_group, n_group)
    E, D, N = 16, 8, 12
    top_k = min(top_k, topk_group * E // n_group)
    gate = MoEGate(D, E, top_k, n_group, topk_group, route_scale=2.5)
    gate.e_score_correction_bias.uniform_(-0.5, 0.5)
    x = torch.randn(N, D)
    weights, idx = gate(x)
    scores = torch.sigmoid(x @ gate.weight.T)
    biased = scores + gate.e_score_correction_bias
    for n in range(N):
        # Groups ranked by the sum of their two best biased scores; experts only from the best groups.
        per_group = biased[n].view(n_group, -1)
        group_score = per_group.topk(min(2, per_group.shape[1]), dim=-1)[0].sum(-1)
        allowed_groups = set(group_score.topk(topk_group)[1].tolist())
        assert {int(e) // (E // n_group) for e in idx[n]} <= allowed_groups
        allowed = torch.tensor([e // (E // n_group) in allowed_groups for e in range(E)])
        best = biased[n].masked_fill(~allowed, float("-inf")).topk(top_k)[1]
        assert set(best.tolist()) == set(idx[n].tolist())
        # Weights: unbiased sigmoid scores, renormalised, times route_scale.
        w = scores[n, idx[n]]
        torch.testing.assert_close(weights[n], w / w.sum() * 2.5)


def test_moe_equals_dense_mixture():
    torch.manual_seed(0)
    D, E = 16, 8
    moe = MoE(D, 8, E, n_shared_experts=2, top_k=3, n_group=2, topk_group=1, route_scale=1.5)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 7, D)
    weights, idx = moe.gate(x.view(-1, D))
    dense_w = torch.zeros(14, E).scatter_(1, idx, weights)  # [N, E]
    all_out = torch.stack([e(x.view(-1, D)) for e in moe.experts], dim=1)  # [N, E, D]
    want = (dense_w[..., None] * all_out).sum(1) + moe.shared_experts(x.view(-1, D))
    torch.testing.assert_close(moe(x), want.view(2, 7, D))
    assert isinstance(moe.shared_experts, MLP) and moe.shared_experts.up_proj.out_features == 16


def test_fp8_block_dequantisation():
    torch.manual_seed(0)
    w = torch.randn(200, 300)
    # Per 128x128 block scale, the DeepSeek layout (stored scale multiplies the fp8 value).
    scale = torch.empty(2, 3)
    for i in range(2):
        for j in range(3):
            scale[i, j] = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].abs().max() / 448.0
    full_scale = scale.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    q = (w / full_scale).to(torch.float8_e4m3fn)
    deq = dequantize_fp8_blockwise(q, scale, dtype=torch.float32)
    torch.testing.assert_close(deq, q.float() * full_scale)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 per element (plus subnormals near 0).
    assert bool(((deq - w).abs() <= w.abs() / 16 + full_scale * 2**-9).all())


def assert_sharded_round_trip(model, model_class, directory, ids, max_shard_size=64 * 1024):
    """``model.save_pretrained`` into several safetensors shards with an index, and
    ``model_class.from_pretrained`` back: the same config, the same tensors (values and dtypes),
    trainable parameters, the same logits on ``ids``."""
    model.save_pretrained(str(directory), max_shard_size=max_shard_size)
    with open(directory / "model.safetensors.index.json") as f:
        index = json.load(f)
    shards = set(index["weight_map"].values())
    assert len(shards) > 3 and all((directory / s).exists() for s in shards)
    assert set(index["weight_map"]) == set(model.state_dict())
    loaded = model_class.from_pretrained(str(directory))
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v) and loaded.state_dict()[k].dtype == v.dtype, k
    assert all(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def assert_checkpoint_errors_name_the_keys(model_class, directory, write_checkpoint, tensors, config_json, config, *,
                                           missing, unexpected, misshapen):
    """A checkpoint of ``tensors`` without ``missing``, with an ``unexpected`` key and ``misshapen``
    = (name, shape) at a wrong shape: the error names each; a directory without weights says so.
    Returns the message."""
    tensors = dict(tensors)
    del tensors[missing]
    tensors[unexpected] = torch.zeros(2, 2)
    name, shape = misshapen
    tensors[name] = torch.zeros(shape)
    write_checkpoint(str(directory), tensors, config_json)
    with pytest.raises(CheckpointError) as err:
        model_class.from_pretrained(str(directory))
    msg = str(err.value)
    assert "missing keys (1)" in msg and missing in msg
    assert "unexpected keys (1)" in msg and unexpected in msg
    assert "shape mismatches (1)" in msg and f"{name}: checkpoint {tuple(shape)}" in msg
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        model_class.from_pretrained(str(directory / "missing"), config=config)
    return msg
