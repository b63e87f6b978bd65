"""DeepSeek V3.2 reference model (models/deepseek_v32.py): semantics, API and checkpoints on CPU."""
import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import dsgraph.models.deepseek_v32 as dsv32
from dsgraph.models import (CheckpointError, DeepseekV32Config, DeepseekV32ForCausalLM, compute_indexer_kl_loss,
                    hadamard_transform_torch, mla_attention, mla_attention_absorbed)
from test_models_common import assert_checkpoint_errors_name_the_keys, assert_sharded_round_trip

CFG = DeepseekV32Config.tiny()


@functools.lru_cache(maxsize=None)
def _model(**overrides) -> DeepseekV32ForCausalLM:
    """The tiny model, seed 0, under a config variant (same weights for every variant); shared, so
    tests that modify the model or accumulate gradients use _fresh."""
    torch.manual_seed(0)
    return DeepseekV32ForCausalLM(DeepseekV32Config.tiny(**overrides)).eval()


def _fresh(**overrides) -> DeepseekV32ForCausalLM:
    return _model.__wrapped__(**overrides)


def _topk_tied(scores: tuple, k: int) -> bool:
    """Whether any row's k-th and (k+1)-th best indexer scores tie: which key top-k keeps is then
    up to the kernel (ReLU makes exact ties at 0 common in a 4-head indexer)."""
    for s in scores:
        if s.shape[-1] > k:
            v = s.topk(k + 1, dim=-1)[0]
            if bool(((v[..., k - 1] == v[..., k]) & v[..., k].isfinite()).any()):
                return True
    return False


def _ids(B, S, seed=0):
    return torch.randint(0, CFG.vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# Forward API
# ------------------------------------------------------------------------------------------------
@settings(deadline=None)
@given(B=st.integers(1, 3), S=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_shapes_dtypes_and_loss(B, S, seed):
    ids = _ids(B, S, seed)
    out = _model()(ids, labels=ids, output_indexer_scores=True, output_indexer_kl_target=True)
    assert out.logits.shape == (B, S, CFG.vocab_size) and out.logits.dtype == torch.float32
    assert len(out.indexer_scores) == len(out.indexer_kl_targets) == CFG.num_hidden_layers
    for s, t in zip(out.indexer_scores, out.indexer_kl_targets):
        assert s.shape == t.shape == (B, S, S) and s.dtype == t.dtype == torch.float32
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, CFG.vocab_size), ids[:, 1:].reshape(-1)) if S > 1 else None
    if S > 1:
        torch.testing.assert_close(out.loss, want)
    assert out.past_key_values is None
    plain = _model()(ids)
    assert plain.loss is None and plain.indexer_scores is None and plain.indexer_kl_targets is None


def test_bf16_model_runs():
    model = _fresh().to(torch.bfloat16)
    ids = _ids(2, 10)
    out = model(ids, labels=ids, output_indexer_scores=True, output_indexer_kl_target=True)
    assert out.logits.dtype == torch.float32 and bool(out.logits.isfinite().all())
    assert model.model.layers[0].self_attn.q_a_proj.weight.dtype == torch.bfloat16
    ref = _model()(ids).logits
    # bf16 weights and activations (8 mantissa bits) through 3 layers: loose, but catches wiring errors.
    assert F.cosine_similarity(out.logits.flatten(), ref.flatten(), dim=0) > 0.98


@settings(deadline=None)
@given(S=st.integers(2, 14), data=st.data(), topk=st.sampled_from([1, 3, 4, 64]), sparse=st.booleans())
def test_causality(S, data, topk, sparse):
    cut = data.draw(st.integers(1, S - 1))
    model = _model(index_topk=topk, use_sparse_attention=sparse)
    ids = _ids(2, S, seed=S)
    changed = ids.clone()
    changed[:, cut:] = (changed[:, cut:] + 1 + data.draw(st.integers(0, 100))) % CFG.vocab_size
    a = model(ids, output_indexer_scores=True, output_indexer_kl_target=True)
    b = model(changed, output_indexer_scores=True, output_indexer_kl_target=True)
    torch.testing.assert_close(a.logits[:, :cut], b.logits[:, :cut])
    for sa, sb, ta, tb in zip(a.indexer_scores, b.indexer_scores, a.indexer_kl_targets, b.indexer_kl_targets):
        torch.testing.assert_close(sa[:, :cut], sb[:, :cut])
        torch.testing.assert_close(ta[:, :cut], tb[:, :cut])
    assert not torch.allclose(a.logits[:, cut:], b.logits[:, cut:])


@settings(deadline=None)
@given(S=st.integers(1, 16), extra=st.integers(0, 8), seed=st.integers(0, 2**16))
def test_dense_equals_sparse_when_topk_covers_all_keys(S, extra, seed):
    ids = _ids(2, S, seed)
    sparse = _model(index_topk=S + extra)(ids, output_indexer_kl_target=True)
    dense = _model(use_sparse_attention=False)(ids, output_indexer_kl_target=True)
    torch.testing.assert_close(sparse.logits, dense.logits)
    for a, b in zip(sparse.indexer_kl_targets, dense.indexer_kl_targets):
        torch.testing.assert_close(a, b)


def test_sparse_attention_is_live_and_follows_the_indexer():
    ids = _ids(2, 12)
    model = _model(index_topk=3)
    out = model(ids, output_indexer_scores=True, output_indexer_kl_target=True)
    assert not torch.allclose(out.logits, _model(use_sparse_attention=False)(ids).logits)
    for scores, target in zip(out.indexer_scores, out.indexer_kl_targets):
        # Only the indexer's top-3 keys (per query) receive attention.
        chosen = torch.zeros_like(target, dtype=torch.bool).scatter_(-1, scores.topk(3, dim=-1)[1], True)
        assert bool((target[~chosen] == 0).all())
        assert bool(((target > 0).sum(-1) <= 3).all())


def test_dense_mode_ignores_the_indexer_unless_asked():
    ids = _ids(2, 10)
    model = _fresh(use_sparse_attention=False)
    before = model(ids).logits
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.indexer.wk.weight.mul_(-3.0)
    torch.testing.assert_close(model(ids).logits, before)
    out = model(ids, output_indexer_scores=True)  # dense warm-up: indexer scores against dense attention
    assert len(out.indexer_scores) == CFG.num_hidden_layers and out.indexer_scores[0].requires_grad


# ------------------------------------------------------------------------------------------------
# Indexer training outputs
# ------------------------------------------------------------------------------------------------
def test_kl_targets_and_indexer_scores():
    ids = _ids(2, 11)
    model = _model()
    out = model(ids, output_indexer_scores=True, output_indexer_kl_target=True)
    future = torch.ones(11, 11, dtype=torch.bool).triu(1)
    for scores, target in zip(out.indexer_scores, out.indexer_kl_targets):
        assert not target.requires_grad and target.grad_fn is None
        torch.testing.assert_close(target.sum(-1), torch.ones(2, 11))
        assert bool((target >= 0).all()) and bool((target[:, future] == 0).all())
        assert scores.requires_grad
        assert bool((scores[:, future] == float("-inf")).all()) and bool(scores[:, ~future].isfinite().all())


def test_kl_loss_matches_direct_kl_and_trains_only_through_the_indexer():
    ids = _ids(2, 9)
    model = _fresh(index_topk=4)
    out = model(ids, output_indexer_scores=True, output_indexer_kl_target=True)
    loss = compute_indexer_kl_loss(out.indexer_scores, out.indexer_kl_targets)
    per_layer = []
    for scores, target in zip(out.indexer_scores, out.indexer_kl_targets):
        rows = [F.kl_div(F.log_softmax(scores[b, s, :s + 1], -1), target[b, s, :s + 1], reduction="sum")
                for b in range(2) for s in range(9)]
        per_layer.append(torch.stack(rows).mean())
    torch.testing.assert_close(loss, torch.stack(per_layer).mean())
    assert loss > 0
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["model.layers.1.self_attn.indexer.wq_b.weight"].abs().sum() > 0
    assert grads["model.layers.1.self_attn.indexer.weights_proj.weight"].abs().sum() > 0
    # The targets are detached and top-k is not differentiable: the KL loss reaches no main-model weight
    # of the last layer (earlier layers feed the indexer's inputs x and qr, so they do get gradients).
    assert grads["model.layers.1.self_attn.o_proj.weight"] is None
    assert grads["lm_head.weight"] is None


def test_kl_loss_is_zero_when_indexer_matches_target():
    target = torch.softmax(torch.randn(2, 5, 5), -1).tril()
    target = target / target.sum(-1, keepdim=True)
    scores = torch.log(target)  # -inf where target is 0, as the masked indexer scores
    loss = compute_indexer_kl_loss((scores, scores), (target, target))
    torch.testing.assert_close(loss, torch.tensor(0.0))


# ------------------------------------------------------------------------------------------------
# Hadamard rotation
# ------------------------------------------------------------------------------------------------
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@settings(deadline=None)
@given(log_n=st.integers(0, 10), lead=st.lists(st.integers(1, 3), max_size=2),
       scale=st.floats(-4, 4, allow_nan=False), seed=st.integers(0, 2**16))
def test_hadamard_equals_sylvester_matrix(log_n, lead, scale, seed):
    n = 1 << log_n
    x = torch.randn(*lead, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(hadamard_transform_torch(x, scale), scale * x @ _sylvester(n).T)


def test_hadamard_dtype_orthogonality_and_errors():
    x = torch.randn(4, 128)
    y = hadamard_transform_torch(x, 128 ** -0.5)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # orthonormal at scale n^-1/2
    torch.testing.assert_close(hadamard_transform_torch(y, 128 ** -0.5), x)  # and an involution
    assert hadamard_transform_torch(x.bfloat16(), 1.0).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="power-of-2"):
        hadamard_transform_torch(torch.randn(3, 12), 1.0)


# ------------------------------------------------------------------------------------------------
# MLA: MQA ("absorbed") mode == MHA mode
# ------------------------------------------------------------------------------------------------
@settings(deadline=None)
@given(B=st.integers(1, 2), S=st.integers(1, 6), past=st.integers(0, 5), H=st.integers(1, 4),
       dn=st.sampled_from([4, 8]), r=st.sampled_from([2, 4]), dv=st.sampled_from([4, 6]), c=st.sampled_from([8, 12]),
       topk=st.integers(1, 12), pad=st.integers(0, 3), kl=st.booleans(), seed=st.integers(0, 2**16))
def test_absorbed_mla_equals_mha_mode(B, S, past, H, dn, r, dv, c, topk, pad, kl, seed):
    g = torch.Generator().manual_seed(seed)
    T = S + past
    q_nope, q_pe = torch.randn(B, S, H, dn, generator=g), torch.randn(B, S, H, r, generator=g)
    kv, k_pe = torch.randn(B, T, c, generator=g), torch.randn(B, T, r, generator=g)
    kv_b = torch.nn.Linear(c, H * (dn + dv), bias=False)
    torch.nn.init.normal_(kv_b.weight, generator=g)
    causal = torch.full((S, T), float("-inf")).triu_(past + 1)
    idx = torch.rand(B, S, T, generator=g).topk(min(topk, T), dim=-1)[1]
    mask = torch.full((B, S, T), float("-inf")).scatter_(-1, idx, 0) + causal
    mask[..., 0] = 0  # keep one key per row: a row with every key at -inf is NaN in both modes
    keep = torch.ones(B, T)
    keep[:, 1:1 + pad] = 0
    padding = (1.0 - keep[:, None, None, :]) * torch.finfo(torch.float32).min
    scale = (dn + r) ** -0.5
    mha, t_mha = mla_attention(q_nope, q_pe, kv, k_pe, kv_b, mask, padding, scale, dv, kl)
    mqa, t_mqa = mla_attention_absorbed(q_nope, q_pe, kv, k_pe, kv_b.weight, mask, padding, scale, dv, kl)
    assert mha.shape == mqa.shape == (B, S, H, dv)
    # Both compute fp32 scores from N(0,1) data whose dot products reach ~10; atol scaled to that.
    torch.testing.assert_close(mqa, mha, rtol=1e-4, atol=1e-4)
    if kl:
        torch.testing.assert_close(t_mqa, t_mha, rtol=1e-4, atol=1e-5)
    else:
        assert t_mha is None and t_mqa is None


def test_model_with_absorbed_mla_matches(monkeypatch):
    ids = _ids(2, 10)
    model = _model()
    want = model(ids).logits

    def absorbed(q_nope, q_pe, kv, k_pe, kv_b_proj, *args):
        return mla_attention_absorbed(q_nope, q_pe, kv, k_pe, kv_b_proj.weight, *args)

    monkeypatch.setattr(dsv32, "mla_attention", absorbed)
    torch.testing.assert_close(model(ids).logits, want)


# ------------------------------------------------------------------------------------------------
# KV cache, generate, padding
# ------------------------------------------------------------------------------------------------
@settings(deadline=None)
@given(prompt=st.integers(1, 8), chunks=st.lists(st.integers(1, 3), min_size=1, max_size=4),
       topk=st.sampled_from([2, 4, 64]), sparse=st.booleans(), seed=st.integers(0, 2**16))
def test_decode_with_cache_equals_full_forward(prompt, chunks, topk, sparse, seed):
    model = _model(index_topk=topk, use_sparse_attention=sparse)
    ids = _ids(2, prompt + sum(chunks), seed)
    full = model(ids, output_indexer_scores=True)
    assume(not (sparse and _topk_tied(full.indexer_scores, topk)))
    out = model(ids[:, :prompt], use_cache=True, output_indexer_scores=True)
    logits, scores, pos = [out.logits], [out.indexer_scores[-1]], prompt
    for n in chunks:
        out = model(ids[:, pos:pos + n], past_key_values=out.past_key_values, use_cache=True,
                    output_indexer_scores=True)
        logits.append(out.logits)
        scores.append(F.pad(out.indexer_scores[-1], (0, ids.shape[1] - pos - n), value=float("-inf")))
        pos += n
    assert out.past_key_values[0].kv.shape == (2, ids.shape[1], CFG.kv_lora_rank)
    assert out.past_key_values[0].index_k.shape == (2, ids.shape[1], CFG.index_head_dim)
    torch.testing.assert_close(torch.cat(logits, 1), full.logits)
    padded = [F.pad(scores[0], (0, ids.shape[1] - prompt), value=float("-inf"))] + scores[1:]
    torch.testing.assert_close(torch.cat(padded, 1), full.indexer_scores[-1])


def test_generate_is_greedy_over_full_forwards():
    model = _model(index_topk=3)
    prompt = _ids(2, 5)
    out = model.generate(prompt, max_new_tokens=6)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    ids = prompt
    for _ in range(6):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


def test_generate_stops_at_eos():
    model = _model()
    prompt = _ids(1, 4)
    first = int(model(prompt).logits[0, -1].argmax())
    out = model.generate(prompt, max_new_tokens=5, eos_token_id=first)
    assert out.shape == (1, 5) and int(out[0, -1]) == first


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_leaves_real_tokens_unchanged(side):
    model = _model()
    a, b = _ids(1, 9, seed=1), _ids(1, 6, seed=2)
    pad = torch.zeros(1, 3, dtype=torch.long)
    padded_b = torch.cat([pad, b], 1) if side == "left" else torch.cat([b, pad], 1)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0 if side == "left" else 1
    mask[1, 6:] = 1 if side == "left" else 0
    out = model(torch.cat([a, padded_b]), attention_mask=mask, output_indexer_scores=True)
    torch.testing.assert_close(out.logits[:1], model(a).logits)
    real = slice(3, 9) if side == "left" else slice(0, 6)
    # RoPE is relative, so left padding (shifted absolute positions) changes nothing either.
    torch.testing.assert_close(out.logits[1:, real], model(b).logits, rtol=1e-4, atol=1e-4)
    assert bool(out.logits.isfinite().all())
    assert bool((out.indexer_scores[0][1, real][:, mask[1] == 0] < -1e30).all())


def test_generate_left_padded_batch_matches_single_rows():
    model = _model()
    a, b = _ids(1, 6, seed=3), _ids(1, 4, seed=4)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    out = model.generate(batch, max_new_tokens=4, attention_mask=mask)
    assert torch.equal(out[0], model.generate(a, max_new_tokens=4)[0])
    assert torch.equal(out[1, 2:], model.generate(b, max_new_tokens=4)[0])


def test_bad_attention_mask_shape():
    with pytest.raises(ValueError, match="attention_mask"):
        _model()(_ids(2, 5), attention_mask=torch.ones(2, 4))


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
def _official_shapes(c: DeepseekV32Config) -> dict:
    """The official Hugging Face V3.2 parameter names and shapes, written out by hand."""
    D, Q, C, R, H = c.hidden_size, c.q_lora_rank, c.kv_lora_rank, c.qk_rope_head_dim, c.num_attention_heads
    Dn, Dv, Hi, Di, E = c.qk_nope_head_dim, c.v_head_dim, c.index_n_heads, c.index_head_dim, c.n_routed_experts
    shapes = {"model.embed_tokens.weight": (c.vocab_size, D), "model.norm.weight": (D,),
              "lm_head.weight": (c.vocab_size, D)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_a_proj.weight": (Q, D), p + "self_attn.q_a_layernorm.weight": (Q,),
            p + "self_attn.q_b_proj.weight": (H * (Dn + R), Q),
            p + "self_attn.kv_a_proj_with_mqa.weight": (C + R, D), p + "self_attn.kv_a_layernorm.weight": (C,),
            p + "self_attn.kv_b_proj.weight": (H * (Dn + Dv), C), p + "self_attn.o_proj.weight": (D, H * Dv),
            p + "self_attn.indexer.wq_b.weight": (Hi * Di, Q), p + "self_attn.indexer.wk.weight": (Di, D),
            p + "self_attn.indexer.k_norm.weight": (Di,), p + "self_attn.indexer.k_norm.bias": (Di,),
            p + "self_attn.indexer.weights_proj.weight": (Hi, D)})
        if i < c.first_k_dense_replace:
            mlps = {p + "mlp.": c.intermediate_size}
        else:
            shapes.update({p + "mlp.gate.weight": (E, D), p + "mlp.gate.e_score_correction_bias": (E,)})
            mlps = {p + f"mlp.experts.{j}.": c.moe_intermediate_size for j in range(E)}
            mlps[p + "mlp.shared_experts."] = c.n_shared_experts * c.moe_intermediate_size
        for m, inter in mlps.items():
            shapes.update({m + "gate_proj.weight": (inter, D), m + "up_proj.weight": (inter, D),
                           m + "down_proj.weight": (D, inter)})
    return shapes


def _official_config(**overrides) -> dict:
    cfg = DeepseekV32Config.tiny(**overrides).to_dict()
    # Keys of a real config.json that this model has no use for must be accepted.
    cfg.update(num_key_value_heads=cfg["num_attention_heads"], torch_dtype="bfloat16", topk_method="noaux_tc",
               hidden_act="silu", transformers_version="4.44.2")
    return cfg


def test_official_names_are_the_model_names():
    assert {k: tuple(v.shape) for k, v in _model().state_dict().items()} == _official_shapes(CFG)


def test_save_load_round_trip_sharded(tmp_path):
    model = _fresh(index_topk=3)
    model.model.layers[1].mlp.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    assert_sharded_round_trip(model, DeepseekV32ForCausalLM, tmp_path, _ids(2, 8))
    dense = DeepseekV32ForCausalLM.from_pretrained(str(tmp_path),
                                                   config=DeepseekV32Config.tiny(use_sparse_attention=False))
    assert not dense.config.use_sparse_attention
    half = DeepseekV32ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16


def test_load_checkpoint_written_under_official_names(tmp_path, write_checkpoint):
    shapes = _official_shapes(CFG)
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}
    # A multi-token-prediction layer after the last layer, as in the official checkpoint: ignored.
    tensors["model.layers.2.eh_proj.weight"] = torch.randn(CFG.hidden_size, 2 * CFG.hidden_size)
    tensors["model.layers.2.self_attn.q_a_proj.weight"] = torch.randn(CFG.q_lora_rank, CFG.hidden_size)
    write_checkpoint(str(tmp_path), tensors, _official_config(num_nextn_predict_layers=1), n_shards=3)
    model = DeepseekV32ForCausalLM.from_pretrained(str(tmp_path))
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    for k in shapes:
        assert torch.equal(params[k], tensors[k]), k
    assert bool(model(_ids(1, 6)).logits.isfinite().all())


def test_load_fp8_checkpoint(tmp_path, write_checkpoint):
    shapes = _official_shapes(CFG)
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}
    fp8 = ["model.layers.0.self_attn.q_b_proj.weight", "model.layers.1.mlp.experts.3.down_proj.weight",
           "model.layers.1.self_attn.indexer.wq_b.weight"]
    want, orig = {}, {}
    for k in fp8:
        w = orig[k] = tensors[k]
        blocks = -(-w.shape[0] // 128), -(-w.shape[1] // 128)
        scale = torch.full(blocks, float(w.abs().max()) / 448)
        tensors[k] = (w / scale[0, 0]).to(torch.float8_e4m3fn)
        tensors[k + "_scale_inv"] = scale
        want[k] = tensors[k].float() * scale[0, 0]
    write_checkpoint(str(tmp_path), tensors, _official_config())
    model = DeepseekV32ForCausalLM.from_pretrained(str(tmp_path))
    params = dict(model.named_parameters())
    for k in fp8:
        torch.testing.assert_close(params[k], want[k])
        # e4m3 rounding: relative error <= 2^-4, plus the subnormal step near zero.
        assert bool(((params[k] - orig[k]).abs() <= orig[k].abs() / 16 + 1e-3).all())
    del tensors[fp8[0] + "_scale_inv"]
    write_checkpoint(str(tmp_path / "noscale"), tensors, _official_config())
    with pytest.raises(CheckpointError, match="q_b_proj.weight_scale_inv"):
        DeepseekV32ForCausalLM.from_pretrained(str(tmp_path / "noscale"))


def test_checkpoint_errors_name_every_bad_key(tmp_path, write_checkpoint):
    tensors = {k: torch.zeros(s) for k, s in _official_shapes(CFG).items()}
    assert_checkpoint_errors_name_the_keys(
        DeepseekV32ForCausalLM, tmp_path, write_checkpoint, tensors, _official_config(), CFG,
        missing="model.layers.1.self_attn.indexer.weights_proj.weight",
        unexpected="model.layers.0.self_attn.indexer.wq.weight",
        misshapen=("model.layers.1.self_attn.kv_b_proj.weight", (3, 5)))


def test_full_size_config_matches_v32():
    c = DeepseekV32Config()
    assert (c.hidden_size, c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank) == (7168, 128, 1536, 512)
    assert (c.index_n_heads, c.index_head_dim, c.index_topk, c.use_sparse_attention) == (64, 128, 2048, True)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group) == (256, 8, 8, 4)
    assert c.yarn["factor"] == 40 and c.routed_scaling_factor == 2.5
    assert DeepseekV32Config.from_dict(c.to_dict()) == c
    with torch.device("meta"):
        attn = dsv32.DeepseekV32Attention(c)
    assert attn.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * torch.log(torch.tensor(40.0)).item() + 1) ** 2)
    with pytest.raises(ValueError, match="power of 2"):
        DeepseekV32Config.tiny(index_head_dim=48)
