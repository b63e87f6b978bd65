"""Nemotron V3 reference model (models/nemotron_v3.py): SSD, decode caches, blocks and checkpoints on CPU;
mamba-ssm comparisons on a GPU."""
import functools
import logging
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dsgraph.models.nemotron_v3 as nv3
from dsgraph.models import (NemotronV3Cache, NemotronV3Config, NemotronV3ForCausalLM, mamba_kernels,
                            ssd_chunked, ssd_naive)
from test_models_common import assert_checkpoint_errors_name_the_keys, assert_sharded_round_trip

CFG = NemotronV3Config.tiny()


@functools.lru_cache(maxsize=None)
def _model(**overrides) -> NemotronV3ForCausalLM:
    """The tiny model, seed 0, shared between tests (those that modify it use _fresh)."""
    torch.manual_seed(0)
    return NemotronV3ForCausalLM(NemotronV3Config.tiny(**overrides)).eval()


def _fresh(**overrides) -> NemotronV3ForCausalLM:
    return _model.__wrapped__(**overrides)


def _ids(B, S, seed=0):
    return torch.randint(0, CFG.vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))


def _ssd_inputs(b, L, h, p, g, n, seed, dtype=torch.float64, device="cpu"):
    """Random SSD inputs with decays from ~1 (slow) to ~e^-7 per step (fast), so chunk-crossing terms matter."""
    gen = torch.Generator().manual_seed(seed)
    r = functools.partial(torch.randn, generator=gen, dtype=dtype)
    x, B, C, z = r(b, L, h, p), r(b, L, g, n), r(b, L, g, n), r(b, L, h, p)
    dt = F.softplus(r(b, L, h) - 1)
    A = -torch.exp(r(h))
    D, h0 = r(h), r(b, h, p, n)
    return [t.to(device) for t in (x, dt, A, B, C, D, z, h0)]


# ------------------------------------------------------------------------------------------------
# SSD
# ------------------------------------------------------------------------------------------------
def test_segsum_is_the_segment_sum():
    a = torch.randn(2, 7, dtype=torch.float64)
    s = nv3.segsum(a)
    for i in range(7):
        for j in range(7):
            want = a[:, j + 1:i + 1].sum(-1) if j <= i else torch.full((2,), -math.inf, dtype=torch.float64)
            torch.testing.assert_close(s[:, i, j], want)


@settings(deadline=None)
@given(b=st.integers(1, 2), L=st.integers(1, 40), g=st.sampled_from([1, 2]), heads_per_group=st.integers(1, 3),
       p=st.integers(1, 4), n=st.integers(1, 6), chunk=st.integers(1, 16), use_d=st.booleans(),
       use_z=st.booleans(), use_h0=st.booleans(), seed=st.integers(0, 2**16))
def test_chunked_ssd_equals_naive_recurrence(b, L, g, heads_per_group, p, n, chunk, use_d, use_z, use_h0, seed):
    x, dt, A, B, C, D, z, h0 = _ssd_inputs(b, L, g * heads_per_group, p, g, n, seed)
    kw = dict(D=D if use_d else None, z=z if use_z else None, initial_states=h0 if use_h0 else None)
    y, state = ssd_chunked(x, dt, A, B, C, chunk, **kw)
    y_ref, state_ref = ssd_naive(x, dt, A, B, C, **kw)
    # float64 throughout: the two orders of summation agree to rounding, so the default tolerances hold.
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(state, state_ref)
    assert y.shape == x.shape and state.shape == (b, g * heads_per_group, p, n)


@settings(deadline=None)
@given(L=st.integers(2, 30), data=st.data(), chunk=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_chunked_ssd_resumes_from_its_final_state(L, data, chunk, seed):
    split = data.draw(st.integers(1, L - 1))
    x, dt, A, B, C, D, _, h0 = _ssd_inputs(2, L, 4, 3, 2, 5, seed)
    y, state = ssd_chunked(x, dt, A, B, C, chunk, D=D, initial_states=h0)
    y1, s1 = ssd_chunked(x[:, :split], dt[:, :split], A, B[:, :split], C[:, :split], chunk, D=D, initial_states=h0)
    y2, s2 = ssd_chunked(x[:, split:], dt[:, split:], A, B[:, split:], C[:, split:], chunk, D=D, initial_states=s1)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y)
    torch.testing.assert_close(s2, state)


def test_ssd_dtypes_and_decay():
    x, dt, A, B, C, D, z, h0 = _ssd_inputs(1, 20, 4, 3, 2, 5, seed=1, dtype=torch.float32)
    y, state = ssd_chunked(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), 8, D=D)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    y32, _ = ssd_chunked(x.bfloat16().float(), dt, A, B.bfloat16().float(), C.bfloat16().float(), 8, D=D)
    # Same fp32 math on the same (bf16-representable) inputs; only the final cast to bf16 differs.
    torch.testing.assert_close(y.float(), y32, atol=0, rtol=2**-8)
    # A huge decay forgets everything before the step: the output then depends on the current input only.
    y_forget, _ = ssd_chunked(x, dt.clamp(min=1.0), torch.full_like(A, -1e4), B, C, 8, initial_states=h0)
    local = torch.einsum("blhp,blhn,blhn->blhp", x * dt.clamp(min=1.0)[..., None],
                         B.repeat_interleave(2, 2), C.repeat_interleave(2, 2))
    torch.testing.assert_close(y_forget, local)


# ------------------------------------------------------------------------------------------------
# Blocks
# ------------------------------------------------------------------------------------------------
def test_tiny_preset_has_every_block_type():
    model = _model()
    types = [layer.block_type for layer in model.backbone.layers]
    assert set(types) == {"mamba", "attention", "mlp", "moe"}
    mixers = {t: type(layer.mixer) for t, layer in zip(types, model.backbone.layers)}
    assert mixers == {"mamba": nv3.NemotronV3Mamba2Mixer, "attention": nv3.NemotronV3Attention,
                      "mlp": nv3.ReluSquaredMLP, "moe": nv3.NemotronV3MoE}
    # The tiny sequences of these tests span several SSD chunks, and GQA really groups heads.
    assert CFG.chunk_size < 16 and CFG.num_attention_heads > CFG.num_key_value_heads > 1 and CFG.n_groups > 1


def test_gated_rmsnorm_normalises_each_group_after_the_gate():
    norm = nv3.MambaRMSNormGated(8, group_size=4, eps=1e-5)
    norm.weight.data = torch.randn(8)
    x, gate = torch.randn(3, 8), torch.randn(3, 8)
    g = (x * F.silu(gate)).view(3, 2, 4)
    want = (g / g.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()).view(3, 8) * norm.weight
    torch.testing.assert_close(norm(x, gate), want)
    # Groups are independent: scaling the second group's input leaves the first group's output alone.
    x2 = x.clone()
    x2[:, 4:] *= 10
    torch.testing.assert_close(norm(x2, gate)[:, :4], norm(x, gate)[:, :4])


def test_relu_squared_mlp():
    mlp = nv3.ReluSquaredMLP(6, 10)
    x = torch.randn(4, 6)
    h = x @ mlp.up_proj.weight.T
    torch.testing.assert_close(mlp(x), torch.where(h > 0, h * h, 0.0) @ mlp.down_proj.weight.T)


def test_moe_matches_the_routing_formula():
    moe = _model().backbone.layers[3].mixer
    moe.gate.e_score_correction_bias.uniform_(-0.2, 0.2)
    try:
        x = torch.randn(2, 5, CFG.hidden_size, generator=torch.Generator().manual_seed(3))
        out = moe(x)
        E, k = CFG.n_routed_experts, CFG.num_experts_per_tok
        for t, tok in enumerate(x.view(-1, CFG.hidden_size)):
            s = torch.sigmoid(moe.gate.weight @ tok)
            choice = s + moe.gate.e_score_correction_bias
            groups = choice.view(CFG.n_group, -1).topk(2, -1)[0].sum(-1).topk(CFG.topk_group)[1]
            allowed = torch.zeros(E, dtype=torch.bool).view(CFG.n_group, -1)
            allowed[groups] = True
            idx = choice.masked_fill(~allowed.flatten(), -math.inf).topk(k)[1]
            w = s[idx] / s[idx].sum() * CFG.routed_scaling_factor
            want = sum(wi * moe.experts[int(i)](tok) for wi, i in zip(w, idx)) + moe.shared_experts(tok)
            torch.testing.assert_close(out.view(-1, CFG.hidden_size)[t], want)
    finally:
        moe.gate.e_score_correction_bias.zero_()


def test_attention_equals_sdpa():
    attn = _model().backbone.layers[1].mixer
    x = torch.randn(2, 9, CFG.hidden_size)
    mask = torch.full((9, 9), float("-inf")).triu(1)
    out, _ = attn(x, mask)
    q = attn.q_proj(x).view(2, 9, 4, 16).transpose(1, 2)
    k = attn.k_proj(x).view(2, 9, 2, 16).transpose(1, 2)
    v = attn.v_proj(x).view(2, 9, 2, 16).transpose(1, 2)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, attn.o_proj(want.transpose(1, 2).flatten(2)))


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------
@settings(deadline=None)
@given(B=st.integers(1, 3), S=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_shapes_and_loss(B, S, seed):
    ids = _ids(B, S, seed)
    out = _model()(ids, labels=ids)
    assert out.logits.shape == (B, S, CFG.vocab_size) and out.logits.dtype == torch.float32
    assert bool(out.logits.isfinite().all()) and out.past_key_values is None
    if S > 1:
        want = F.cross_entropy(out.logits[:, :-1].reshape(-1, CFG.vocab_size), ids[:, 1:].reshape(-1))
        torch.testing.assert_close(out.loss, want)


@settings(deadline=None)
@given(S=st.integers(2, 20), data=st.data(), seed=st.integers(0, 2**16))
def test_causality(S, data, seed):
    j = data.draw(st.integers(0, S - 1))
    ids = _ids(1, S, seed)
    changed = ids.clone()
    changed[0, j] = (ids[0, j] + 1) % CFG.vocab_size
    a, b = _model()(ids).logits, _model()(changed).logits
    # Not bitwise: an expert's matmul over a different set of routed tokens rounds differently (~1e-7);
    # a leak from the future would be O(1).
    torch.testing.assert_close(a[:, :j], b[:, :j])
    assert not torch.allclose(a[:, j:], b[:, j:])


@settings(deadline=None)
@given(prompt=st.integers(1, 12), chunks=st.lists(st.integers(1, 10), min_size=1, max_size=4),
       seed=st.integers(0, 2**16))
def test_decode_with_cache_equals_full_forward(prompt, chunks, seed):
    """Prefill, then steps of one token (``ssd_step``) or several (chunked SSD from the cached state)."""
    model = _model()
    ids = _ids(2, prompt + sum(chunks), seed)
    full = model(ids).logits
    out = model(ids[:, :prompt], use_cache=True)
    logits, pos = [out.logits], prompt
    for n in chunks:
        out = model(ids[:, pos:pos + n], past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits)
        pos += n
    assert out.past_key_values.length == ids.shape[1]
    # fp32: the chunked and the step-wise scan sum in different orders (~1e-6 apart); defaults hold.
    torch.testing.assert_close(torch.cat(logits, dim=1), full)


def test_cache_layout():
    out = _model()(_ids(2, 11), use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, NemotronV3Cache) and cache.length == 11
    conv_dim = CFG.mamba_intermediate_size + 2 * CFG.n_groups * CFG.ssm_state_size
    for layer, c in zip(_model().backbone.layers, cache.layers):
        if layer.block_type == "mamba":
            assert c.conv.shape == (2, conv_dim, CFG.conv_kernel - 1)
            assert c.ssm.shape == (2, CFG.mamba_num_heads, CFG.mamba_head_dim, CFG.ssm_state_size)
            assert c.ssm.dtype == torch.float32
        elif layer.block_type == "attention":
            assert c.k.shape == c.v.shape == (2, 11, CFG.num_key_value_heads, CFG.head_dim)
        else:
            assert c is None


def test_generate_is_greedy_over_full_forwards():
    model = _model()
    ids = _ids(2, 5)
    out = model.generate(ids, max_new_tokens=7)
    seq = ids
    for _ in range(7):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_generate_stops_at_eos():
    model = _model()
    ids = _ids(1, 4)
    first = model.generate(ids, max_new_tokens=6)
    eos = int(first[0, 6])  # the third generated token
    out = model.generate(ids, max_new_tokens=6, eos_token_id=eos)
    assert out.shape[1] <= 7 and int(out[0, -1]) == eos and torch.equal(out[0, :7], first[0, :out.shape[1]])


def test_left_padding_leaves_real_tokens_unchanged():
    model = _model()
    ids = _ids(1, 9)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 9)], dim=1)
    torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 4:], model(ids).logits)


def test_generate_left_padded_batch_matches_single_rows():
    model = _model()
    a, b = _ids(1, 9, seed=1), _ids(1, 5, seed=2)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], dim=1)])
    mask = torch.ones(2, 9)
    mask[1, :4] = 0
    out = model.generate(batch, max_new_tokens=5, attention_mask=mask)
    assert torch.equal(out[0, 9:], model.generate(a, max_new_tokens=5)[0, 9:])
    assert torch.equal(out[1, 9:], model.generate(b, max_new_tokens=5)[0, 5:])


def test_bad_attention_mask_shape():
    with pytest.raises(ValueError, match="attention_mask"):
        _model()(_ids(2, 5), attention_mask=torch.ones(2, 4))


def test_bf16_model_runs():
    model = _fresh().to(torch.bfloat16)
    ids = _ids(2, 12)
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.float32 and bool(out.logits.isfinite().all())
    ref = _model()(ids).logits
    # bf16 weights and activations (8 mantissa bits) through 5 blocks: loose, but catches wiring errors.
    assert F.cosine_similarity(out.logits.flatten(), ref.flatten(), dim=0) > 0.98


def test_gradients_reach_every_parameter():
    model = _fresh()
    ids = _ids(2, 12)
    model(ids, labels=ids).loss.backward()
    # Every routed expert is hit by some token only by chance, so experts are checked as a whole.
    no_grad = [n for n, p in model.named_parameters() if p.grad is None and ".experts." not in n]
    assert not no_grad
    assert any(p.grad is not None for n, p in model.named_parameters() if ".experts." in n)


def test_config_validation_and_round_trip():
    c = NemotronV3Config()
    assert c.num_hidden_layers == 52 and c.mamba_intermediate_size == 4096
    assert c.hybrid_override_pattern.count("M") == 23 and c.hybrid_override_pattern.count("*") == 6
    assert NemotronV3Config.from_dict(c.to_dict()) == c
    listed = dict(CFG.to_dict(), layers_block_type=["mamba", "attention", "mlp", "moe", "mamba"],
                  eos_token_id=[2, 11])
    del listed["hybrid_override_pattern"]
    assert NemotronV3Config.from_dict(listed) == CFG
    for kw, match in ((dict(hybrid_override_pattern="M*X"), "hybrid_override_pattern"),
                      (dict(mamba_num_heads=3), "mamba_num_heads"), (dict(mlp_hidden_act="silu"), "mlp_hidden_act"),
                      (dict(moe_latent_size=16), "moe_latent_size")):
        with pytest.raises(ValueError, match=match):
            NemotronV3Config.tiny(**kw)


def test_models_do_not_import_dsgraph():
    with open(nv3.__file__) as f:
        source = f.read()
    assert "import dsgraph" not in source and "from dsgraph" not in source


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
def _official_shapes(c: NemotronV3Config) -> dict:
    """The Hugging Face Nemotron-H parameter names and shapes, written out by hand."""
    D, I, H, G, N = c.hidden_size, c.mamba_intermediate_size, c.mamba_num_heads, c.n_groups, c.ssm_state_size
    conv = I + 2 * G * N
    shapes = {"backbone.embeddings.weight": (c.vocab_size, D), "backbone.norm_f.weight": (D,),
              "lm_head.weight": (c.vocab_size, D)}
    for i, t in enumerate(c.hybrid_override_pattern):
        p = f"backbone.layers.{i}."
        shapes[p + "norm.weight"] = (D,)
        m = p + "mixer."
        if t == "M":
            shapes.update({m + "in_proj.weight": (I + conv + H, D), m + "conv1d.weight": (conv, 1, c.conv_kernel),
                           m + "conv1d.bias": (conv,), m + "dt_bias": (H,), m + "A_log": (H,), m + "D": (H,),
                           m + "norm.weight": (I,), m + "out_proj.weight": (D, I)})
        elif t == "*":
            q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
            shapes.update({m + "q_proj.weight": (q, D), m + "k_proj.weight": (kv, D), m + "v_proj.weight": (kv, D),
                           m + "o_proj.weight": (D, q)})
        else:
            mlps = {m: c.intermediate_size} if t == "-" else \
                {**{m + f"experts.{j}.": c.moe_intermediate_size for j in range(c.n_routed_experts)},
                 m + "shared_experts.": c.moe_shared_expert_intermediate_size}
            if t == "E":
                shapes.update({m + "gate.weight": (c.n_routed_experts, D),
                               m + "gate.e_score_correction_bias": (c.n_routed_experts,)})
            for name, inter in mlps.items():
                shapes.update({name + "up_proj.weight": (inter, D), name + "down_proj.weight": (D, inter)})
    return shapes


def _official_config() -> dict:
    cfg = CFG.to_dict()
    # Keys of a real config.json that this model has no use for must be accepted.
    cfg.update(torch_dtype="bfloat16", rope_theta=10000, mamba_proj_bias=False, num_logits_to_keep=1,
               transformers_version="4.55.4", expand=2)
    del cfg["time_step_limit"]  # absent from the released config.json: the default (0, inf) applies
    return cfg


def test_official_names_are_the_model_names():
    assert {k: tuple(v.shape) for k, v in _model().state_dict().items()} == _official_shapes(CFG)


def test_save_load_round_trip_sharded(tmp_path):
    model = _fresh()
    model.backbone.layers[3].mixer.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    assert_sharded_round_trip(model, NemotronV3ForCausalLM, tmp_path, _ids(2, 10), max_shard_size=32 * 1024)
    half = NemotronV3ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16


def test_load_checkpoint_written_under_official_names(tmp_path, write_checkpoint):
    shapes = _official_shapes(CFG)
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}
    tensors["mtp.layers.0.eh_proj.weight"] = torch.randn(CFG.hidden_size, 2 * CFG.hidden_size)  # ignored
    write_checkpoint(str(tmp_path), tensors, _official_config(), n_shards=3)
    model = NemotronV3ForCausalLM.from_pretrained(str(tmp_path))
    assert model.config == CFG
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    for k in shapes:
        assert torch.equal(params[k], tensors[k]), k
    assert bool(model(_ids(1, 6)).logits.isfinite().all())


def test_checkpoint_errors_name_every_bad_key(tmp_path, write_checkpoint):
    tensors = {k: torch.zeros(s) for k, s in _official_shapes(CFG).items()}
    assert_checkpoint_errors_name_the_keys(
        NemotronV3ForCausalLM, tmp_path, write_checkpoint, tensors, _official_config(), CFG,
        missing="backbone.layers.0.mixer.A_log", unexpected="backbone.layers.2.mixer.gate_proj.weight",
        misshapen=("backbone.layers.4.mixer.conv1d.weight", (3, 1, 4)))


# ------------------------------------------------------------------------------------------------
# mamba-ssm (optional)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def no_cached_kernels():
    mamba_kernels.cache_clear()
    yield
    mamba_kernels.cache_clear()


def test_mamba_ssm_absent_is_logged_once(monkeypatch, caplog, no_cached_kernels):
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # makes any import of it fail
    with caplog.at_level(logging.INFO, logger="dsgraph.models"):
        assert mamba_kernels() is None and mamba_kernels() is None
    assert [r.message for r in caplog.records if "mamba-ssm kernels unavailable" in r.message] != []
    assert len(caplog.records) == 1


def test_mamba_triton_modules_load_without_the_package_init(tmp_path, monkeypatch, no_cached_kernels):
    """A package whose __init__ needs a missing CUDA extension, as a CPU install of mamba-ssm: its Triton
    modules still load, and a CPU forward never calls them."""
    root = tmp_path / "mamba_ssm"
    (root / "ops" / "triton").mkdir(parents=True)
    (root / "__init__.py").write_text("import selective_scan_cuda\n")
    (root / "ops" / "__init__.py").write_text("")
    (root / "ops" / "triton" / "__init__.py").write_text("")
    for module, fn in (("ssd_combined", "mamba_chunk_scan_combined"), ("layernorm_gated", "rmsnorm_fn")):
        (root / "ops" / "triton" / f"{module}.py").write_text(
            f"def {fn}(*args, **kwargs):\n    raise AssertionError('called on CPU')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        kernels = mamba_kernels()
        assert kernels is not None
        assert kernels.mamba_chunk_scan_combined.__module__ == "mamba_ssm.ops.triton.ssd_combined"
        assert kernels.rmsnorm_fn.__module__ == "mamba_ssm.ops.triton.layernorm_gated"
        assert bool(_model()(_ids(1, 10)).logits.isfinite().all())
    finally:
        for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
            del sys.modules[name]


def _gpu_kernels():
    kernels = mamba_kernels()
    if kernels is None:
        pytest.skip("mamba-ssm is not installed (pip install 'dsgraph[mamba]')")
    return kernels


@pytest.mark.gpu
@pytest.mark.parametrize("L,chunk", [(100, 32), (257, 64), (7, 16)])
def test_chunked_ssd_matches_mamba_ssm(L, chunk):
    kernels = _gpu_kernels()
    x, dt_raw, A, B, C, D, z, h0 = _ssd_inputs(2, L, 8, 16, 2, 32, seed=L, dtype=torch.float32, device="cuda")
    dt_bias = torch.randn(8, device="cuda")
    y, state = kernels.mamba_chunk_scan_combined(x, dt_raw, A, B, C, chunk, D=D, z=z, dt_bias=dt_bias,
                                                 initial_states=h0, dt_softplus=True, dt_limit=(0.0, 2.0),
                                                 return_final_states=True)
    dt = F.softplus(dt_raw + dt_bias).clamp(0.0, 2.0)
    y_ref, state_ref = ssd_chunked(x.double(), dt.double(), A.double(), B.double(), C.double(), chunk,
                                   D=D.double(), z=z.double(), initial_states=h0.double())
    # The Triton kernels multiply in tf32 (10-bit mantissa, 2^-11 relative rounding): their error scales with
    # the terms summed, not with the (possibly cancelling) result, so it is bounded relative to the largest
    # output; a semantic difference (decay, grouping, D, z, dt) shows up as O(1).
    for got, want in ((y, y_ref), (state, state_ref)):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 5e-3, float(err)


@pytest.mark.gpu
def test_gated_rmsnorm_matches_mamba_ssm():
    kernels = _gpu_kernels()
    norm = nv3.MambaRMSNormGated(256, group_size=64).cuda()
    norm.weight.data.normal_()
    x, gate = torch.randn(4, 10, 256, device="cuda"), torch.randn(4, 10, 256, device="cuda")
    want = kernels.rmsnorm_fn(x, norm.weight, None, z=gate, eps=norm.eps, group_size=64, norm_before_gate=False)
    torch.testing.assert_close(norm(x, gate), want)


@pytest.mark.gpu
def test_model_with_mamba_ssm_matches_plain_torch():
    _gpu_kernels()
    torch.manual_seed(0)
    fast = NemotronV3ForCausalLM(NemotronV3Config.tiny()).cuda().eval()
    plain = NemotronV3ForCausalLM(NemotronV3Config.tiny(use_mamba_kernels=False)).cuda().eval()
    plain.load_state_dict(fast.state_dict())
    ids = _ids(2, 37).cuda()
    logits = fast(ids).logits
    # tf32 products inside the scan kernels (see above) through two Mamba2 blocks.
    torch.testing.assert_close(logits, plain(ids).logits, atol=5e-3, rtol=5e-3)
    # Prefill through the kernels, then decode steps (plain-torch step, kernel norm) and a chunk from the cache.
    out = fast(ids[:, :20], use_cache=True)
    parts = [out.logits]
    for a, b in ((20, 21), (21, 22), (22, 37)):
        out = fast(ids[:, a:b], past_key_values=out.past_key_values, use_cache=True)
        parts.append(out.logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), logits, atol=5e-3, rtol=5e-3)
