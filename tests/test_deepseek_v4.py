"""DeepSeek V4 reference model (models/deepseek_v4.py): semantics, layer types and checkpoints on CPU."""
import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dsgraph
import dsgraph.models.deepseek_v4 as dsv4
from dsgraph.models import (DeepseekV4Config, DeepseekV4ForCausalLM, hc_split_sinkhorn,
                            overlap_transform, sink_attention, sinkhorn_normalize)
from test_models_common import assert_checkpoint_errors_name_the_keys, assert_sharded_round_trip

CFG = DeepseekV4Config.tiny()
# Small ratios so that short sequences pool keys on every compressed layer (same code paths).
SHORT = dict(compress_ratios=(0, 4, 8))


@functools.lru_cache(maxsize=None)
def _model(**overrides) -> DeepseekV4ForCausalLM:
    """The tiny model, seed 0, under a config variant; shared, so tests that modify it use _fresh."""
    return _fresh(**overrides)


def _fresh(**overrides) -> DeepseekV4ForCausalLM:
    torch.manual_seed(0)
    return DeepseekV4ForCausalLM(DeepseekV4Config.tiny(**dict(sorted(overrides.items())))).eval()


def _ids(B, S, seed=0):
    return torch.randint(0, CFG.vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))


def _x(B, S, seed=0, dim=CFG.hidden_size):
    return torch.randn(B, S, dim, generator=torch.Generator().manual_seed(seed))


def _freqs(config, S, compressed, start=0):
    return dsv4.rope_freqs_cis(config.inv_freq(compressed), torch.arange(start, start + S))


# ------------------------------------------------------------------------------------------------
# Config and forward API
# ------------------------------------------------------------------------------------------------
def test_layer_types_of_the_presets():
    assert CFG.layer_types == ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
    layers = _model().layers
    assert not hasattr(layers[0].attn, "compressor")
    assert layers[1].attn.compressor.overlap and layers[1].attn.indexer is not None
    assert layers[2].attn.compressor.compress_ratio == 128 and layers[2].attn.indexer is None
    assert layers[0].ffn.gate.hash and not layers[1].ffn.gate.hash  # hash routing on the first layer
    flash = DeepseekV4Config()
    kinds = flash.layer_types
    assert len(kinds) == 43 and kinds[:2] == ["sliding_attention"] * 2
    assert kinds.count("compressed_sparse_attention") == 21 and kinds.count("heavily_compressed_attention") == 20


@pytest.mark.parametrize("bad, match", [(dict(num_key_value_heads=2), "num_key_value_heads"),
                                        (dict(o_groups=3), "o_groups"), (dict(compress_ratios=[0, 4]), "entries"),
                                        (dict(scoring_func="relu"), "scoring_func"),
                                        (dict(index_head_dim=24), "power of 2")])
def test_invalid_config(bad, match):
    with pytest.raises(ValueError, match=match):
        DeepseekV4Config.tiny(**bad)


@settings(deadline=None)
@given(B=st.integers(1, 3), S=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_shapes_dtypes_and_loss(B, S, seed):
    ids = _ids(B, S, seed)
    out = _model(**SHORT)(ids, labels=ids)
    assert out.logits.shape == (B, S, CFG.vocab_size) and out.logits.dtype == torch.float32
    assert bool(out.logits.isfinite().all())
    if S > 1:
        want = F.cross_entropy(out.logits[:, :-1].reshape(-1, CFG.vocab_size), ids[:, 1:].reshape(-1))
        torch.testing.assert_close(out.loss, want)
    assert _model(**SHORT)(ids).loss is None


def test_loss_trains_every_parameter():
    model = _fresh()
    ids = _ids(2, 260)  # > 128: the ratio-128 layer pools two keys
    model(ids, labels=ids).loss.backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)}
    # Top-k is not differentiable: the LM loss never reaches the indexer (it needs its own loss).
    indexer = {n for n, _ in model.named_parameters() if ".indexer." in n}
    assert indexer <= no_grad
    # Besides, only experts no token was routed to get no gradient.
    assert all(".experts." in n for n in no_grad - indexer), sorted(no_grad - indexer)


def test_bf16_model_runs():
    model = _fresh(**SHORT).to(torch.bfloat16)
    ids = _ids(2, 24)
    out = model(ids)
    assert out.logits.dtype == torch.float32 and bool(out.logits.isfinite().all())
    ref = _model(**SHORT)(ids).logits
    # bf16 weights and activations (8 mantissa bits) through 3 layers: loose, but catches wiring errors.
    assert F.cosine_similarity(out.logits.flatten(), ref.flatten(), dim=0) > 0.98


@settings(deadline=None)
@given(S=st.integers(2, 48), data=st.data())
def test_causality(S, data):
    cut = data.draw(st.integers(1, S - 1))
    model = _model(**SHORT)
    ids = _ids(2, S, seed=S)
    changed = ids.clone()
    changed[:, cut:] = (changed[:, cut:] + 1 + data.draw(st.integers(0, 100))) % CFG.vocab_size
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :cut], b[:, :cut])
    assert not torch.allclose(a[:, cut:], b[:, cut:])


def test_causality_with_ratio_128():
    ids = _ids(1, 300)
    changed = ids.clone()
    changed[:, 200:] = (changed[:, 200:] + 7) % CFG.vocab_size
    a, b = _model()(ids).logits, _model()(changed).logits
    torch.testing.assert_close(a[:, :200], b[:, :200])
    assert not torch.allclose(a[:, 200:], b[:, 200:])


# ------------------------------------------------------------------------------------------------
# Attention: window, pooled keys, indexer, sink, q norm, RoPE, grouped output
# ------------------------------------------------------------------------------------------------
def test_masks_match_their_definitions():
    S, w, r = 13, 4, 3
    i, j = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    want = torch.where((j <= i) & (j >= i - w + 1), 0.0, float("-inf"))
    torch.testing.assert_close(dsv4.sliding_window_mask(S, w), want)
    P = S // r
    i, p = torch.meshgrid(torch.arange(S), torch.arange(P), indexing="ij")
    # pooled key p covers tokens p*r .. p*r + r - 1: visible from the query at its last token on
    want = torch.where(i >= p * r + r - 1, 0.0, float("-inf"))
    torch.testing.assert_close(dsv4.compressed_causal_mask(S, P, r), want)


def _attn(layer: int, **overrides):
    config = DeepseekV4Config.tiny(**overrides)
    torch.manual_seed(1)
    model = DeepseekV4ForCausalLM(config)
    return model.layers[layer].attn, config


@settings(deadline=None)
@given(window=st.integers(1, 9), S=st.integers(2, 30), data=st.data())
def test_window_semantics(window, S, data):
    """A key just outside the window has no influence; the one at the window's edge has."""
    attn, config = _attn(0, sliding_window=window)
    j = data.draw(st.integers(0, S - 1))
    x = _x(1, S, seed=S)
    y = x.clone()
    y[:, j] += 1.0
    freqs = _freqs(config, S, compressed=False)
    with torch.no_grad():
        a, b = attn(x, freqs), attn(y, freqs)
    torch.testing.assert_close(a[:, :j], b[:, :j])                    # causal
    torch.testing.assert_close(a[:, j + window:], b[:, j + window:])  # outside the window
    if j + window <= S:  # the last query whose window still holds key j
        assert not torch.allclose(a[:, j + window - 1], b[:, j + window - 1])


@settings(deadline=None)
@given(ratio=st.sampled_from([2, 3, 4, 5, 8]), data=st.data())
def test_pooled_keys_visible_only_after_their_window_completes(ratio, data):
    # Window 1: a query's only local key is itself, so token t reaches later queries only through
    # its pooled key p = t // ratio (and, with ratio 4's overlap, p + 1, which completes later).
    ratios = [0, ratio, 128] if ratio == 4 else [0, 4, ratio]
    attn, config = _attn(1 if ratio == 4 else 2, sliding_window=1, compress_ratios=ratios, index_topk=64)
    S = data.draw(st.integers(2 * ratio, 6 * ratio))
    t = data.draw(st.integers(0, S // ratio * ratio - 1))
    p_done = (t // ratio + 1) * ratio - 1  # the last token of t's window
    x = _x(1, S, seed=t)
    y = x.clone()
    y[:, t] += 1.0
    freqs = _freqs(config, S, compressed=True)
    with torch.no_grad():
        a, b = attn(x, freqs), attn(y, freqs)
    torch.testing.assert_close(a[:, :t], b[:, :t])
    torch.testing.assert_close(a[:, t + 1:p_done], b[:, t + 1:p_done])
    assert not torch.allclose(a[:, p_done:], b[:, p_done:])


def test_indexer_selects_topk_of_causal_relu_scores():
    attn, config = _attn(1)
    S, r = 40, 4
    P = S // r
    x = _x(2, S)
    freqs = _freqs(config, S, compressed=True)
    causal = dsv4.compressed_causal_mask(S, P, r)
    with torch.no_grad():
        qr = attn.q_norm(attn.wq_a(x))
        topk, scores = attn.indexer(x, qr, freqs, causal)
        # Direct: sum_h w[h] * relu(q_h . k) * Di^-0.5 * Hi^-0.5; the Hadamard rotation keeps q . k.
        ix = attn.indexer
        q = dsv4.apply_partial_rope(ix.wq_b(qr).unflatten(-1, (ix.n_heads, ix.head_dim)), freqs)
        k = dsv4.hadamard_transform_torch(ix.compressor(x, freqs), ix.head_dim ** -0.5)  # undo the rotation
        w = ix.weights_proj(x) * (ix.head_dim * ix.n_heads) ** -0.5
        want = torch.einsum("bsh,bsht->bst", w, torch.relu(torch.einsum("bshd,btd->bsht", q, k)))
    assert topk.shape == (2, S, config.index_topk)
    torch.testing.assert_close(scores, want + causal, rtol=1e-4, atol=1e-5)  # fp32 sums in another order
    assert bool((scores.gather(-1, topk) >= scores.topk(config.index_topk, -1)[0][..., -1:]).all())


def test_indexer_is_live_and_topk_covering_all_keys_is_dense():
    ids = _ids(2, 48)
    sparse = _model(**SHORT, index_topk=2)(ids).logits
    full = _model(**SHORT, index_topk=64)(ids).logits
    dense_model = _fresh(**SHORT, index_topk=64)
    dense_model.layers[1].attn.indexer = None  # every visible pooled key, no selection
    torch.testing.assert_close(full, dense_model(ids).logits)
    assert not torch.allclose(sparse, full)


@settings(deadline=None)
@given(B=st.integers(1, 2), S=st.integers(1, 9), T=st.integers(1, 12), H=st.integers(1, 4), seed=st.integers(0, 99))
def test_sink_attention_is_an_extra_softmax_column(B, S, T, H, seed):
    g = torch.Generator().manual_seed(seed)
    q, kv = torch.randn(B, S, H, 8, generator=g), torch.randn(B, T, 8, generator=g)
    sink = torch.randn(H, generator=g)
    mask = torch.where(torch.rand(B, S, T, generator=g) < 0.3, float("-inf"), 0.0)
    mask[..., 0] = 0.0
    out = sink_attention(q, kv, sink, mask, 0.3)
    logits = torch.einsum("bshd,btd->bsht", q, kv) * 0.3 + mask[:, :, None]
    # softmax over keys and sink: exp(l) / (sum exp(l) + exp(sink)); the sink adds no value
    probs = logits.exp() / (logits.exp().sum(-1, keepdim=True) + sink.exp().view(1, 1, H, 1))
    torch.testing.assert_close(out, torch.einsum("bsht,btd->bshd", probs, kv))
    # A very negative sink takes no mass: plain softmax attention.
    plain = torch.einsum("bsht,btd->bshd", logits.softmax(-1), kv)
    torch.testing.assert_close(sink_attention(q, kv, torch.full((H,), -1e4), mask, 0.3), plain)


def test_q_is_rms_normalised_per_head():
    attn, config = _attn(0)
    x, freqs = _x(2, 12), _freqs(config, 12, compressed=False)
    with torch.no_grad():
        want = attn(x, freqs)
        # Scaling one head's query rows (a per-head scale) changes nothing after the per-head norm.
        attn.wq_b.weight[config.head_dim:2 * config.head_dim] *= 7.0
        torch.testing.assert_close(attn(x, freqs), want)
        # A whole-q norm would not absorb it: mixing the scale inside a head does change the output.
        attn.wq_b.weight[:config.head_dim // 2] *= 7.0
        assert not torch.allclose(attn(x, freqs), want)


@settings(deadline=None)
@given(S=st.integers(1, 10), rd=st.sampled_from([2, 4, 8]), extra=st.sampled_from([0, 2, 6]), seed=st.integers(0, 99),
       start=st.integers(0, 1000))
def test_interleaved_rope_equals_pairwise_rotation(S, rd, extra, seed, start):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, S, 3, rd + extra, generator=g)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rd, 2).float() / rd)
    freqs = dsv4.rope_freqs_cis(inv_freq, torch.arange(start, start + S))
    angle = torch.arange(start, start + S).float()[:, None] * inv_freq          # [S, rd/2]
    cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]
    even, odd = x[..., extra::2], x[..., extra + 1::2]                          # pairs (2k, 2k+1) of the tail
    want = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
    got = dsv4.apply_partial_rope(x, freqs)
    torch.testing.assert_close(got[..., :extra], x[..., :extra])
    torch.testing.assert_close(got[..., extra:], want, rtol=1e-5, atol=2e-5)  # fp32 angles up to ~1000 rad
    torch.testing.assert_close(dsv4.apply_partial_rope(got, freqs, inverse=True), x, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_attention_is_position_shift_invariant(layer, monkeypatch):
    """RoPE on q and K = V plus the inverse rotation on the output make a layer depend only on
    relative positions; without the inverse rotation it does not."""
    attn, config = _attn(layer, compress_ratios=[0, 4, 8], index_topk=64)
    S, shift = 24, 8  # a multiple of every ratio: the pooled windows are the same tokens
    x = _x(1, S)
    with torch.no_grad():
        a = attn(x, _freqs(config, S, compressed=layer > 0))
        b = attn(x, _freqs(config, S, compressed=layer > 0, start=shift))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # fp32 rotations by different angles
        rope = dsv4.apply_partial_rope
        monkeypatch.setattr(dsv4, "apply_partial_rope", lambda t, f, inverse=False: t if inverse else rope(t, f))
        a = attn(x, _freqs(config, S, compressed=layer > 0))
        b = attn(x, _freqs(config, S, compressed=layer > 0, start=shift))
    assert not torch.allclose(a, b, rtol=1e-3, atol=1e-3)


def test_grouped_output_is_block_diagonal():
    attn, config = _attn(0)
    x, freqs = _x(2, 10), _freqs(config, 10, compressed=False)
    captured = []
    attn.wo_b.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    heads_per_group, r = config.num_attention_heads // config.o_groups, config.o_lora_rank
    with torch.no_grad():
        attn(x, freqs)
        attn.wq_b.weight[heads_per_group * config.head_dim:] *= -1.5  # perturb only group 1's query heads
        attn(x, freqs)
    a, b = captured
    assert a.shape == (2, 10, config.o_groups * r)
    torch.testing.assert_close(a[..., :r], b[..., :r])  # group 0's low-rank slice sees only its own heads
    assert not torch.allclose(a[..., r:], b[..., r:])


# ------------------------------------------------------------------------------------------------
# Compressor pooling
# ------------------------------------------------------------------------------------------------
def test_overlap_transform_layout():
    t = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).view(2, 3, 2, 4)  # B=2, P=3, r=2, 2d=4
    out = overlap_transform(t, -7.0)
    assert out.shape == (2, 3, 4, 2)
    assert bool((out[:, 0, :2] == -7.0).all())
    torch.testing.assert_close(out[:, 1:, :2], t[:, :-1, :, :2])
    torch.testing.assert_close(out[:, :, 2:], t[..., 2:])


@settings(deadline=None)
@given(ratio=st.sampled_from([2, 3, 4, 8]), windows=st.integers(1, 5), rest=st.integers(0, 7), seed=st.integers(0, 99))
def test_pooling_equals_direct_per_window_computation(ratio, windows, rest, seed):
    S = windows * ratio + rest % ratio  # the incomplete trailing window is not pooled
    config = DeepseekV4Config.tiny(compress_ratios=[0, 4, ratio if ratio != 4 else 8])
    torch.manual_seed(seed)
    comp = dsv4.DeepseekV4Compressor(config, ratio, config.head_dim)
    with torch.no_grad():
        comp.ape.normal_()
        comp.wkv.weight.normal_(std=0.2)
        comp.wgate.weight.normal_(std=0.2)
    x = _x(2, S, seed)
    freqs = _freqs(config, S, compressed=True)
    with torch.no_grad():
        got = comp(x, freqs)
    d, P = config.head_dim, S // ratio
    assert got.shape == (2, P, d)
    kv, gate = comp.wkv(x), comp.wgate(x)
    rows = []
    for n in range(P):
        own = slice(n * ratio, (n + 1) * ratio)
        if ratio == 4:  # own tokens' second half plus the previous window's first half
            slots_kv, slots_g = [kv[:, own, d:]], [gate[:, own, d:] + comp.ape[:, d:]]
            if n > 0:
                prev = slice((n - 1) * ratio, n * ratio)
                slots_kv.insert(0, kv[:, prev, :d])
                slots_g.insert(0, gate[:, prev, :d] + comp.ape[:, :d])
            k, g = torch.cat(slots_kv, 1), torch.cat(slots_g, 1)
        else:
            k, g = kv[:, own], gate[:, own] + comp.ape
        rows.append((k * g.softmax(dim=1)).sum(1))
    pooled = comp.norm(torch.stack(rows, 1))
    want = dsv4.apply_partial_rope(pooled.unsqueeze(2), freqs[::ratio][:P]).squeeze(2)  # RoPE at p * ratio
    torch.testing.assert_close(got, want.detach())


# ------------------------------------------------------------------------------------------------
# Hyper-Connections and Sinkhorn
# ------------------------------------------------------------------------------------------------
@settings(deadline=None)
@given(M=st.integers(2, 6), scale=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_sinkhorn_is_doubly_stochastic(M, scale, seed):
    logits = torch.randn(16, M, M, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    comb = sinkhorn_normalize(logits, 1000, 1e-6)
    assert bool((comb >= 0).all())
    # Row sums converge linearly (slowest for M = 2); 1000 rounds reach 1e-4 for logits of std <= 1.
    torch.testing.assert_close(comb.sum(-1), torch.ones(16, M, dtype=torch.float64), rtol=0, atol=1e-4)
    torch.testing.assert_close(comb.sum(-2), torch.ones(16, M, dtype=torch.float64), rtol=0, atol=1e-5)
    # The model's 20 iterations end on a column normalisation: columns are exact, rows close.
    comb20 = sinkhorn_normalize(logits, 20, 1e-6)
    torch.testing.assert_close(comb20.sum(-2), torch.ones(16, M, dtype=torch.float64), rtol=0, atol=1e-5)


def test_sinkhorn_is_a_loop_of_normalisations():
    logits = torch.randn(3, 4, 4)
    c = logits.softmax(-1) + 1e-6
    c = c / (c.sum(-2, keepdim=True) + 1e-6)
    torch.testing.assert_close(sinkhorn_normalize(logits, 1, 1e-6), c)
    c = c / (c.sum(-1, keepdim=True) + 1e-6)
    c = c / (c.sum(-2, keepdim=True) + 1e-6)
    torch.testing.assert_close(sinkhorn_normalize(logits, 2, 1e-6), c)


def test_hc_split_formulas():
    M, eps = 4, 1e-6
    mixes, scale, base = torch.randn(5, (2 + M) * M), torch.tensor([0.5, 2.0, 1.5]), torch.randn((2 + M) * M)
    pre, post, comb = hc_split_sinkhorn(mixes, scale, base, M, 20, eps)
    torch.testing.assert_close(pre, torch.sigmoid(mixes[:, :M] * 0.5 + base[:M]) + eps)
    torch.testing.assert_close(post, 2 * torch.sigmoid(mixes[:, M:2 * M] * 2.0 + base[M:2 * M]))  # no eps
    logits = (mixes[:, 2 * M:] * 1.5 + base[2 * M:]).view(5, M, M)
    torch.testing.assert_close(comb, sinkhorn_normalize(logits, 20, eps))


def test_block_hyper_connection_formulas():
    block = _model().layers[0]
    M, C = CFG.hc_mult, CFG.hidden_size
    x = torch.randn(2, 5, M, C)
    with torch.no_grad():
        h, post, comb = block.hc_pre(x, block.hc_attn_fn, block.hc_attn_scale, block.hc_attn_base)
        flat = x.flatten(2)
        mixes = (flat / flat.pow(2).mean(-1, keepdim=True).add(CFG.rms_norm_eps).sqrt()) @ block.hc_attn_fn.T
        pre, post_want, comb_want = hc_split_sinkhorn(mixes, block.hc_attn_scale, block.hc_attn_base, M,
                                                      CFG.hc_sinkhorn_iters, CFG.hc_eps)
        torch.testing.assert_close(h, sum(pre[..., j, None] * x[:, :, j] for j in range(M)))
        torch.testing.assert_close(post, post_want)
        torch.testing.assert_close(comb, comb_want)
        out = torch.randn(2, 5, C)
        got = block.hc_post(out, x, post, comb)
        for j in range(M):  # stream j: post_j * out + sum_i comb[i, j] * x_i
            want = post[..., j, None] * out + sum(comb[..., i, j, None] * x[:, :, i] for i in range(M))
            torch.testing.assert_close(got[:, :, j], want)


def test_hyper_head_collapses_streams_by_sigmoid_weights():
    model = _model()
    x = torch.randn(2, 3, CFG.hc_mult, CFG.hidden_size)
    with torch.no_grad():
        flat = x.flatten(2)
        mixes = (flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + CFG.rms_norm_eps)) @ model.hc_head_fn.T
        pre = torch.sigmoid(mixes * model.hc_head_scale + model.hc_head_base) + CFG.hc_eps
        torch.testing.assert_close(model.hc_head(x), (pre[..., None] * x).sum(2))


# ------------------------------------------------------------------------------------------------
# MoE: scoring, hash routing, swiglu limit
# ------------------------------------------------------------------------------------------------
def test_hash_routing_follows_the_token_table():
    gate = _model().layers[0].ffn.gate
    ids = _ids(1, 30).flatten()
    x1, x2 = torch.randn(30, CFG.hidden_size), torch.randn(30, CFG.hidden_size)
    w1, i1 = gate(x1, ids)
    w2, i2 = gate(x2, ids)
    assert torch.equal(i1, gate.tid2eid[ids].long()) and torch.equal(i1, i2)  # experts from the id alone
    scores = F.softplus(x1 @ gate.weight.T).sqrt().gather(1, i1)
    torch.testing.assert_close(w1, scores / scores.sum(-1, keepdim=True) * CFG.routed_scaling_factor)


def test_sqrtsoftplus_topk_routing_with_bias_for_choice_only():
    gate = _fresh().layers[1].ffn.gate
    x = torch.randn(20, CFG.hidden_size)
    scores = F.softplus(x @ gate.weight.T).sqrt()
    weights, idx = gate(x, _ids(1, 20).flatten())
    assert torch.equal(idx, scores.topk(CFG.num_experts_per_tok, -1)[1])
    gate.bias[5] = 100.0  # the bias forces expert 5 in, but its weight is its unbiased score
    weights, idx = gate(x, _ids(1, 20).flatten())
    assert bool((idx == 5).any(-1).all())
    chosen = scores.gather(1, idx)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True) * CFG.routed_scaling_factor)


@pytest.mark.parametrize("limit", [0.0, 0.5])
def test_swiglu_limit(limit):
    torch.manual_seed(0)
    expert = dsv4.DeepseekV4Expert(8, 16, limit)
    x = torch.randn(5, 8) * 10
    gate, up = expert.w1(x), expert.w3(x)
    if limit:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    torch.testing.assert_close(expert(x), expert.w2(F.silu(gate) * up))


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
def _released_shapes(c: DeepseekV4Config) -> dict:
    """The released V4 checkpoint's tensor names and shapes, written out by hand."""
    C, H, D, Q, G, O, M = (c.hidden_size, c.num_attention_heads, c.head_dim, c.q_lora_rank, c.o_groups,
                           c.o_lora_rank, c.hc_mult)
    E, I, mix = c.n_routed_experts, c.moe_intermediate_size, (2 + M) * M
    shapes = {"embed.weight": (c.vocab_size, C), "norm.weight": (C,), "head.weight": (c.vocab_size, C),
              "hc_head_fn": (M, M * C), "hc_head_base": (M,), "hc_head_scale": (1,)}
    for i, ratio in enumerate(c.compress_ratios[:c.num_hidden_layers]):
        p = f"layers.{i}."
        shapes.update({p + "attn_norm.weight": (C,), p + "ffn_norm.weight": (C,), p + "attn.attn_sink": (H,),
                       p + "attn.wq_a.weight": (Q, C), p + "attn.q_norm.weight": (Q,),
                       p + "attn.wq_b.weight": (H * D, Q), p + "attn.wkv.weight": (D, C), p + "attn.kv_norm.weight": (D,),
                       p + "attn.wo_a.weight": (G * O, H * D // G), p + "attn.wo_b.weight": (C, G * O),
                       p + "ffn.gate.weight": (E, C)})
        for site in ("attn", "ffn"):
            shapes.update({p + f"hc_{site}_fn": (mix, M * C), p + f"hc_{site}_base": (mix,),
                           p + f"hc_{site}_scale": (3,)})
        shapes[p + ("ffn.gate.tid2eid" if i < c.num_hash_layers else "ffn.gate.bias")] = (
            (c.vocab_size, c.num_experts_per_tok) if i < c.num_hash_layers else (E,))
        for e in [f"experts.{j}" for j in range(E)] + ["shared_experts"]:
            inter = I * (c.n_shared_experts if e == "shared_experts" else 1)
            shapes.update({p + f"ffn.{e}.w1.weight": (inter, C), p + f"ffn.{e}.w2.weight": (C, inter),
                           p + f"ffn.{e}.w3.weight": (inter, C)})
        comps = {}
        if ratio:
            comps["attn.compressor."] = (ratio, D * (1 + (ratio == 4)), D)
        if ratio == 4:
            comps["attn.indexer.compressor."] = (ratio, 2 * c.index_head_dim, c.index_head_dim)
            shapes.update({p + "attn.indexer.wq_b.weight": (c.index_n_heads * c.index_head_dim, Q),
                           p + "attn.indexer.weights_proj.weight": (c.index_n_heads, C)})
        for pre, (r, width, d) in comps.items():
            shapes.update({p + pre + "ape": (r, width), p + pre + "wkv.weight": (width, C),
                           p + pre + "wgate.weight": (width, C), p + pre + "norm.weight": (d,)})
    return shapes


def test_released_names_are_the_model_names():
    assert {k: tuple(v.shape) for k, v in _model().state_dict().items()} == _released_shapes(CFG)


def test_save_load_round_trip_sharded(tmp_path):
    model = _fresh()
    model.layers[1].ffn.gate.bias.uniform_(-0.1, 0.1)
    assert_sharded_round_trip(model, DeepseekV4ForCausalLM, tmp_path, _ids(1, 20))


def _released_config() -> dict:
    cfg = CFG.to_dict()
    # Keys of the released config.json this model has no use for must be accepted.
    cfg.update(torch_dtype="bfloat16", expert_dtype="fp4", topk_method="noaux_tc",
               quantization_config={"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0"})
    return cfg


def _quantize_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight exactly representable in fp4 e2m1 x power-of-2 scales: (packed int8, e8m0 scale, value)."""
    O, I = w.shape
    codes = torch.randint(0, 16, (O, I), generator=torch.Generator().manual_seed(O * I))
    scale = 2.0 ** torch.randint(-4, 1, (O, I // 32), generator=torch.Generator().manual_seed(I)).float()
    value = torch.tensor(dsv4.FP4_E2M1)[codes] * scale.repeat_interleave(32, 1)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    return packed, scale.to(torch.float8_e8m0fnu), value


def test_load_released_checkpoint_with_fp8_fp4_and_mtp(tmp_path, write_checkpoint):
    state = {k: v.clone() for k, v in _model().state_dict().items()}
    tensors = dict(state)
    # fp8 e4m3 attention weight with a 128x128 block scale (exact: values and scale are powers of 2)
    w = torch.full((CFG.num_attention_heads * CFG.head_dim, CFG.q_lora_rank), 0.5)
    w[::3] = -0.25
    tensors["layers.1.attn.wq_b.weight"] = w.to(torch.float8_e4m3fn)
    tensors["layers.1.attn.wq_b.scale"] = torch.tensor([[4.0]]).to(torch.float8_e8m0fnu)
    state["layers.1.attn.wq_b.weight"] = w * 4.0
    # fp4 routed expert
    packed, scale, value = _quantize_fp4(state["layers.2.ffn.experts.3.w1.weight"])
    tensors["layers.2.ffn.experts.3.w1.weight"], tensors["layers.2.ffn.experts.3.w1.scale"] = packed, scale
    state["layers.2.ffn.experts.3.w1.weight"] = value
    tensors["mtp.0.e_proj.weight"] = torch.zeros(4, 4)  # the MTP block is ignored
    write_checkpoint(str(tmp_path), tensors, _released_config())
    loaded = DeepseekV4ForCausalLM.from_pretrained(str(tmp_path))
    assert loaded.config == CFG
    for k, v in state.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.layers[0].ffn.gate.tid2eid.dtype == torch.int32


def test_checkpoint_errors_name_the_keys(tmp_path, write_checkpoint):
    tensors = {k: v.clone() for k, v in _model().state_dict().items()}
    msg = assert_checkpoint_errors_name_the_keys(
        DeepseekV4ForCausalLM, tmp_path, write_checkpoint, tensors, _released_config(), CFG,
        missing="layers.1.attn.indexer.compressor.ape", unexpected="layers.1.attn.extra.weight",
        misshapen=("layers.2.attn.wo_a.weight", (3, 3)))
    assert "layers.2.attn.wo_a.weight: checkpoint (3, 3) vs model (32, 64)" in msg


def test_explain_lists_every_v4_rewrite_of_the_tiny_model():
    """dsgraph.optimize on the tiny V4 (sliding, ratio 4 + indexer, ratio 128) at S = 132 (one pooled key
    on the ratio-128 layer): the report lists the pooling, the sparse attention with sink (all three layer
    types), the indexer and the Sinkhorn rewrites, and the logits equal eager's."""
    config = DeepseekV4Config.tiny()
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 132), generator=torch.Generator().manual_seed(0))
    opt = dsgraph.optimize(model, policy="reference;residual=eager")
    with torch.no_grad():
        got, want = opt(ids).logits, model(ids).logits
    report = dsgraph.explain(opt)
    final = [r for r in report.rewrites if not r.rolled_back]
    counts = {op: sum(r.op == op for r in final) for op in ("window_pool", "indexer_topk", "sinkhorn")}
    assert counts == {"window_pool": 3, "indexer_topk": 1, "sinkhorn": 2 * config.num_hidden_layers}, report
    sparse = [r for r in final if r.pass_name == "v4_attention"]
    assert len(sparse) == 3 and all("sink" in r.detail for r in sparse), report
    assert sum("no pooled keys" in r.detail for r in sparse) == 1, report
    # the attention pass's dense sites, which v4_attention rewrote in turn, are marked and not served
    dense = [r for r in final if r.op == "attention"]
    assert dense and all(r.replaced_by == "v4_attention" for r in dense), report
    assert not report.sites("attention") and "replaced by the v4_attention pass" in str(report)
    assert all(not r.replaced_by for r in final if r.op in ("window_pool", "sparse_attention", "sinkhorn"))
    torch.testing.assert_close(got, want)
