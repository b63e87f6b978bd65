"""DeepSeek V3.2 (DSA: MLA + Lightning Indexer + MoE) as a plain-eager PyTorch reference.

Computes what DeepSeek's official ``inference/model.py`` computes (bf16 path, no fp8 activation
quantisation), with the Hugging Face V3.2 module names and API (indexer training outputs,
``compute_indexer_kl_loss``, dense mode, ``generate``, safetensors checkpoints). It is written in
the forms dsgraph's passes look for, so keep them: attention as einsum + fp32 ``softmax``, the
causal mask as ``full(-inf).triu_``, the top-k mask as ``full(-inf).scatter_(-1, idx, 0)``, the
indexer's [B, S, H, T] ReLU score, the Hadamard butterfly.

Shapes: B batch, S new tokens, P cached tokens, T = P + S keys, H heads, C ``kv_lora_rank``,
R ``qk_rope_head_dim``, Dn ``qk_nope_head_dim``, Dv ``v_head_dim``, Hi/Di indexer heads/head dim.
Scores are laid out [B, S, H, T] (the official einsum layout), masks [S, T] or [B, S, T] and
padding [B, 1, 1, T], all additive fp32.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .common import (LayerNorm, MLP, MoE, MoEGate, PretrainedMixin, RMSNorm, apply_rope_half, apply_rope_interleaved,
                     greedy_generate, rope_freqs_cis, yarn_inv_freq, yarn_mscale)


@dataclass
class DeepseekV32Config:
    """DeepSeek-V3.2 hyper-parameters under their Hugging Face ``config.json`` names (full size by
    default). Unknown ``config.json`` keys are ignored by ``from_dict``."""
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = field(default_factory=lambda: {
        "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    use_sparse_attention: bool = True
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    num_nextn_predict_layers: int = 1  # MTP layers stored after the last layer; not run here
    initializer_range: float = 0.02
    eos_token_id: Optional[int] = 1

    def __post_init__(self):
        d = self.index_head_dim
        if d & (d - 1) or d < self.qk_rope_head_dim:
            raise ValueError(f"index_head_dim must be a power of 2 (Hadamard) and >= qk_rope_head_dim, got {d}")
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"n_routed_experts {self.n_routed_experts} not divisible by n_group {self.n_group}")

    @classmethod
    def tiny(cls, **overrides) -> "DeepseekV32Config":
        """A ~150k-parameter preset for tests: one dense and one MoE layer, YaRN on (256 > 64 positions)."""
        kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32,
                  kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                  n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                  max_position_embeddings=256,
                  rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
                  index_n_heads=4, index_head_dim=32, index_topk=4, num_nextn_predict_layers=0,
                  initializer_range=0.1)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_dict(cls, d: dict) -> "DeepseekV32Config":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return {"model_type": "deepseek_v32", "architectures": ["DeepseekV32ForCausalLM"], **dataclasses.asdict(self)}

    @property
    def yarn(self) -> Optional[dict]:
        """The YaRN parameters when the context is extended past the original length, else None."""
        rs = self.rope_scaling
        if rs and rs.get("type", rs.get("rope_type")) == "yarn" \
                and self.max_position_embeddings > rs["original_max_position_embeddings"]:
            return rs
        return None


class MLACache(NamedTuple):
    """One layer's decode cache: the compressed MLA keys and the indexer keys of T positions."""
    kv: torch.Tensor       # [B, T, C] normalised latent (keys and values before kv_b_proj)
    k_pe: torch.Tensor     # [B, T, R] roped shared key part
    index_k: torch.Tensor  # [B, T, Di] indexer keys after RoPE and Hadamard rotation


@dataclass
class DeepseekV32CausalLMOutput:
    loss: Optional[torch.Tensor] = None                          # scalar next-token cross-entropy
    logits: Optional[torch.Tensor] = None                        # [B, S, vocab] fp32
    indexer_scores: Optional[tuple[torch.Tensor, ...]] = None     # per layer [B, S, T] fp32, masked
    indexer_kl_targets: Optional[tuple[torch.Tensor, ...]] = None  # per layer [B, S, T] fp32, detached
    past_key_values: Optional[tuple[MLACache, ...]] = None


def hadamard_transform_torch(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * H_n x`` over the last dim (n a power of 2, H_n the Sylvester Hadamard matrix) as the
    log2(n)-step butterfly of strided slices and cats; at least fp32 math, cast back: [..., n] -> [..., n]."""
    n = x.shape[-1]
    if n & (n - 1) or n == 0:
        raise ValueError(f"Hadamard transform needs a power-of-2 size, got {n}")
    dtype = x.dtype
    # [..., n, 1]; each step halves dim -2 and doubles dim -1.
    y = x.to(torch.promote_types(dtype, torch.float32)).unsqueeze(-1)
    for _ in range(n.bit_length() - 1):
        even, odd = y[..., ::2, :], y[..., 1::2, :]
        y = torch.cat((even + odd, even - odd), dim=-1)
    return (y.squeeze(-2) * scale).to(dtype)


def _kl_target(probs: torch.Tensor) -> torch.Tensor:
    """Attention probabilities [B, S, H, T] -> head-summed, L1-normalised, detached [B, S, T]."""
    p = probs.detach().sum(dim=2)
    return p / p.sum(dim=-1, keepdim=True)


def mla_attention(q_nope, q_pe, kv, k_pe, kv_b_proj, mask, padding, softmax_scale: float, v_head_dim: int,
                  output_kl_target: bool = False):
    """MLA in MHA mode (the official prefill): expand the latent to per-head keys and values.

    q_nope [B, S, H, Dn], q_pe [B, S, H, R] (roped), kv [B, T, C] (normed latent), k_pe [B, T, R]
    (roped), ``kv_b_proj`` maps C -> H * (Dn + Dv), mask [S, T] or [B, S, T], padding [B, 1, 1, T]
    or None -> (out [B, S, H, Dv], KL target [B, S, T] or None).
    """
    B, T, _ = kv.shape
    H = q_nope.shape[2]
    kv = kv_b_proj(kv).view(B, T, H, -1)
    k_nope, v = torch.split(kv, [kv.shape[-1] - v_head_dim, v_head_dim], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1)
    k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, H, -1)], dim=-1)
    scores = torch.einsum("bshd,bthd->bsht", q.float(), k.float()) * softmax_scale
    scores += mask.unsqueeze(-2)
    if padding is not None:
        scores += padding
    probs = scores.softmax(dim=-1, dtype=torch.float32)
    target = _kl_target(probs) if output_kl_target else None
    return torch.einsum("bsht,bthd->bshd", probs.type_as(v), v), target


def mla_attention_absorbed(q_nope, q_pe, kv, k_pe, wkv_b: torch.Tensor, mask, padding, softmax_scale: float,
                           v_head_dim: int, output_kl_target: bool = False):
    """MLA in MQA ("absorbed") mode, equal to ``mla_attention``: W_uk is folded into the query, so all
    heads attend over one shared (C + R)-dim key per position with the C-dim latent as value, and
    W_uv is applied after (the layout of FlashMLA / TileLang ``sparse_mla_fwd``).

    Same arguments as ``mla_attention`` except ``wkv_b`` [H * (Dn + Dv), C], the kv_b_proj weight.
    """
    H = q_nope.shape[2]
    wkv_b = wkv_b.view(H, -1, kv.shape[-1])                                   # [H, Dn + Dv, C]
    w_uk, w_uv = wkv_b[:, :-v_head_dim], wkv_b[:, -v_head_dim:]
    q = torch.cat([torch.einsum("bshd,hdc->bshc", q_nope, w_uk), q_pe], dim=-1)  # [B, S, H, C + R]
    k = torch.cat([kv, k_pe], dim=-1)                                          # [B, T, C + R]
    scores = torch.einsum("bshc,btc->bsht", q.float(), k.float()) * softmax_scale
    scores += mask.unsqueeze(-2)
    if padding is not None:
        scores += padding
    probs = scores.softmax(dim=-1, dtype=torch.float32)
    target = _kl_target(probs) if output_kl_target else None
    out = torch.einsum("bsht,btc->bshc", probs.type_as(kv), kv)                # [B, S, H, C]
    return torch.einsum("bshc,hdc->bshd", out, w_uv), target


class DeepseekV32Indexer(nn.Module):
    """Lightning Indexer: per query, a cheap ReLU multi-head score over all keys and its top-k."""

    def __init__(self, config: DeepseekV32Config):
        super().__init__()
        self.n_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.rope_dim, self.index_topk = config.qk_rope_head_dim, config.index_topk
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = LayerNorm(self.head_dim)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)

    def _rotate(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """RoPE on the first R dims (non-interleaved, unlike MLA), then the Hadamard rotation:
        [B, S, h, Di] -> [B, S, h, Di]."""
        x_pe, x_nope = torch.split(x, [self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        x = torch.cat([apply_rope_half(x_pe, freqs_cis), x_nope], dim=-1)
        return hadamard_transform_torch(x, self.head_dim ** -0.5)

    def keys(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """x [B, S, D] -> one shared key per position [B, S, Di]."""
        return self._rotate(self.k_norm(self.wk(x)).unsqueeze(2), freqs_cis).squeeze(2)

    def forward(self, x, qr, freqs_cis, k, mask, padding):
        """x [B, S, D], qr [B, S, q_lora_rank], k [B, T, Di] (``keys`` of all T positions), mask [S, T],
        padding [B, 1, 1, T] or None -> (top-k key indices [B, S, min(index_topk, T)], masked scores
        I [B, S, T] fp32)."""
        B, S, _ = x.shape
        q = self._rotate(self.wq_b(qr).view(B, S, self.n_heads, self.head_dim), freqs_cis)
        weights = self.weights_proj(x).float() * (self.n_heads ** -0.5 * self.head_dim ** -0.5)
        # [B, S, Hi, T] materialised on purpose: the indexer fusion replaces this whole expression.
        logits = torch.einsum("bshd,btd->bsht", q.float(), k.float())
        index_scores = (weights[..., None] * torch.relu(logits)).sum(dim=2)
        index_scores += mask
        if padding is not None:
            index_scores += padding[:, 0]
        topk_indices = index_scores.topk(min(self.index_topk, k.shape[1]), dim=-1)[1]
        return topk_indices, index_scores


class DeepseekV32Attention(nn.Module):
    """MLA with DeepSeek Sparse Attention (HF module names; DeepSeek's in brackets: q_a_proj [wq_a],
    q_a_layernorm [q_norm], q_b_proj [wq_b], kv_a_proj_with_mqa [wkv_a], kv_a_layernorm [kv_norm],
    kv_b_proj [wkv_b], o_proj [wo])."""

    def __init__(self, config: DeepseekV32Config):
        super().__init__()
        c = config
        self.config = c
        self.n_heads, self.kv_lora_rank = c.num_attention_heads, c.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = c.qk_nope_head_dim, c.qk_rope_head_dim
        self.v_head_dim = c.v_head_dim
        qk_head_dim = c.qk_nope_head_dim + c.qk_rope_head_dim
        self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
        self.q_b_proj = nn.Linear(c.q_lora_rank, self.n_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, self.n_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * c.v_head_dim, c.hidden_size, bias=False)
        self.indexer = DeepseekV32Indexer(c)
        self.softmax_scale = qk_head_dim ** -0.5
        if c.yarn is not None:  # YaRN temperature, squared: it scales both q and k
            m = yarn_mscale(c.yarn["factor"], c.yarn.get("mscale_all_dim", c.yarn.get("mscale", 1.0)))
            self.softmax_scale *= m * m

    def forward(self, x, freqs_cis, mask, padding=None, cache: Optional[MLACache] = None, use_cache: bool = False,
                output_indexer_scores: bool = False, output_kl_target: bool = False):
        """x [B, S, D], freqs_cis complex [S, R/2], mask [S, T] causal, padding [B, 1, 1, T] or None,
        cache of the P = T - S earlier positions or None -> (out [B, S, D], indexer scores [B, S, T]
        or None, KL target [B, S, T] or None, updated cache or None)."""
        B, S, _ = x.shape
        sparse = self.config.use_sparse_attention
        qr = self.q_a_layernorm(self.q_a_proj(x))
        q = self.q_b_proj(qr).view(B, S, self.n_heads, -1)
        q_nope, q_pe = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope_interleaved(q_pe, freqs_cis)
        kv, k_pe = torch.split(self.kv_a_proj_with_mqa(x), [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_a_layernorm(kv)
        k_pe = apply_rope_interleaved(k_pe.unsqueeze(2), freqs_cis).squeeze(2)
        # Indexer keys are cached whenever a cache is kept, so decode can switch the indexer on.
        index_k = self.indexer.keys(x, freqs_cis) if sparse or output_indexer_scores or use_cache else None
        if cache is not None:
            kv, k_pe = torch.cat([cache.kv, kv], dim=1), torch.cat([cache.k_pe, k_pe], dim=1)
            if index_k is not None:
                index_k = torch.cat([cache.index_k, index_k], dim=1)
        new_cache = MLACache(kv, k_pe, index_k) if use_cache else None

        index_scores = None
        attn_mask = mask
        if sparse or output_indexer_scores:
            topk_indices, index_scores = self.indexer(x, qr, freqs_cis, index_k, mask, padding)
            if sparse:
                attn_mask = torch.full((B, S, kv.shape[1]), float("-inf"), device=x.device)
                attn_mask = attn_mask.scatter_(-1, topk_indices, 0)
                attn_mask += mask
        out, target = mla_attention(q_nope, q_pe, kv, k_pe, self.kv_b_proj, attn_mask, padding, self.softmax_scale,
                                    self.v_head_dim, output_kl_target)
        # Scores only when asked: a live [B, S, T] output would keep a compiler from fusing them away.
        return self.o_proj(out.flatten(2)), index_scores if output_indexer_scores else None, target, new_cache


class DeepseekV32DecoderLayer(nn.Module):
    """Pre-norm block: MLA then a dense MLP (first ``first_k_dense_replace`` layers) or the MoE."""

    def __init__(self, config: DeepseekV32Config, layer_idx: int):
        super().__init__()
        c = config
        self.self_attn = DeepseekV32Attention(c)
        if layer_idx < c.first_k_dense_replace:
            self.mlp = MLP(c.hidden_size, c.intermediate_size)
        else:
            self.mlp = MoE(c.hidden_size, c.moe_intermediate_size, c.n_routed_experts, c.n_shared_experts,
                           c.num_experts_per_tok, c.n_group, c.topk_group, c.routed_scaling_factor,
                           c.norm_topk_prob, c.scoring_func)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, freqs_cis, mask, padding=None, cache=None, use_cache=False, output_indexer_scores=False,
                output_kl_target=False):
        """x [B, S, D] -> (x [B, S, D], indexer scores, KL target, cache) as in the attention."""
        h, scores, target, cache = self.self_attn(self.input_layernorm(x), freqs_cis, mask, padding, cache, use_cache,
                                                  output_indexer_scores, output_kl_target)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, scores, target, cache


class DeepseekV32Model(nn.Module):
    """Embedding, decoder layers and final norm: token ids [B, S] -> hidden states [B, S, D]."""

    def __init__(self, config: DeepseekV32Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DeepseekV32DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def freqs_cis(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions [S] -> complex RoPE rotations [S, R/2] (YaRN when the config extends the context)."""
        c, y = self.config, self.config.yarn
        inv_freq = yarn_inv_freq(c.qk_rope_head_dim, c.rope_theta, device=positions.device) if y is None else \
            yarn_inv_freq(c.qk_rope_head_dim, c.rope_theta, y["factor"], y["original_max_position_embeddings"],
                          y["beta_fast"], y["beta_slow"], device=positions.device)
        return rope_freqs_cis(inv_freq, positions)

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False,
                output_indexer_scores=False, output_kl_target=False):
        """input_ids [B, S], attention_mask [B, T] (1 keep, 0 pad; T = cached + S) -> (hidden [B, S, D],
        per-layer indexer scores, per-layer KL targets, per-layer caches)."""
        B, S = input_ids.shape
        device = input_ids.device
        P = 0 if past_key_values is None else past_key_values[0].kv.shape[1]
        T = P + S
        freqs_cis = self.freqs_cis(torch.arange(P, T, device=device))
        # Causal mask the official way; the offset lets the S new queries see all P cached keys.
        mask = torch.full((S, T), float("-inf"), device=device).triu_(P + 1)
        padding = None
        if attention_mask is not None:
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask must be [batch, cached + new] = {(B, T)}, "
                                 f"got {tuple(attention_mask.shape)}")
            # finfo.min, not -inf: a fully padded row (a left-pad query) stays finite after softmax.
            padding = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        h = self.embed_tokens(input_ids)
        scores, targets, caches = [], [], []
        for i, layer in enumerate(self.layers):
            h, s, t, cache = layer(h, freqs_cis, mask, padding, None if past_key_values is None else past_key_values[i],
                                   use_cache, output_indexer_scores, output_kl_target)
            scores.append(s)
            targets.append(t)
            caches.append(cache)
        return self.norm(h), tuple(scores), tuple(targets), tuple(caches)


class DeepseekV32ForCausalLM(PretrainedMixin, nn.Module):
    """DeepSeek-V3.2 language model with the HF V3.2 forward API. ``from_pretrained`` takes the Hugging
    Face layout (fp8 weights with ``weight_scale_inv`` dequantised); ``config=`` overrides config.json
    (e.g. dense mode)."""

    config_class = DeepseekV32Config

    def __init__(self, config: DeepseekV32Config):
        super().__init__()
        self.config = config
        self.model = DeepseekV32Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding, MoEGate)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, output_indexer_scores: bool = False,
                output_indexer_kl_target: bool = False, past_key_values: Optional[tuple[MLACache, ...]] = None,
                use_cache: bool = False) -> DeepseekV32CausalLMOutput:
        """input_ids [B, S]; attention_mask [B, T] (T = cached + S); labels [B, S] (-100 ignored, shifted
        inside). ``output_indexer_scores``: per-layer masked indexer scores I [B, S, T] (with grad; also
        computed in dense mode, for the dense warm-up). ``output_indexer_kl_target``: per-layer targets
        p [B, S, T]: this layer's attention probabilities summed over heads and L1-normalised over keys,
        detached. ``past_key_values`` / ``use_cache``: decode with the per-layer ``MLACache``."""
        hidden, scores, targets, caches = self.model(input_ids, attention_mask, past_key_values, use_cache,
                                                     output_indexer_scores, output_indexer_kl_target)
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return DeepseekV32CausalLMOutput(loss=loss, logits=logits,
                                         indexer_scores=scores if output_indexer_scores else None,
                                         indexer_kl_targets=targets if output_indexer_kl_target else None,
                                         past_key_values=caches if use_cache else None)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, attention_mask: Optional[torch.Tensor] = None,
                 eos_token_id: Optional[int] = None) -> torch.Tensor:
        """Greedy decoding with the KV cache: [B, S] -> [B, S + n] (n <= max_new_tokens; rows that
        produced ``eos_token_id`` are padded with it until every row has)."""
        return greedy_generate(self, input_ids, max_new_tokens, attention_mask, eos_token_id)

    @classmethod
    def ignored_keys(cls, config: DeepseekV32Config) -> Optional[str]:
        # The multi-token-prediction layers follow the last layer in the official checkpoints.
        mtp = range(config.num_hidden_layers, config.num_hidden_layers + config.num_nextn_predict_layers)
        return rf"model\.layers\.({'|'.join(map(str, mtp))})\." if len(mtp) else None


def compute_indexer_kl_loss(indexer_scores: tuple[torch.Tensor, ...],
                            indexer_kl_targets: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """L_I = sum_t KL(p_t || softmax(I_t)) per query (tech report eq. 3), averaged over batch and
    queries, then over layers. Scores and targets per layer [B, S, T]; masked keys (I = -inf,
    p = 0) contribute 0."""
    losses = []
    for scores, p in zip(indexer_scores, indexer_kl_targets, strict=True):
        log_q = F.log_softmax(scores.float(), dim=-1)
        kl = torch.where(p > 0, p * (torch.log(p) - log_q), 0.0)
        losses.append(kl.sum(dim=-1).mean())
    return torch.stack(losses).mean()
