"""DeepSeek V4 (V4-Flash) as a plain-eager PyTorch reference.

Computes what DeepSeek's ``inference/model.py`` computes for a full-sequence (training / prefill)
forward in bf16 or fp32 (no fp8/fp4 activation quantisation, no KV cache), with the module names
of the released checkpoint (``embed``, ``layers.{i}.attn.wq_a``, ``layers.{i}.ffn.experts.{j}.w1``,
``layers.{i}.hc_attn_fn``, ``hc_head_fn`` ...). It is written in the forms dsgraph's passes look for,
so keep them: the sliding window as ``arange`` comparisons, the sink as an extra softmax column
sliced off, attention as einsum + fp32 softmax, the top-k mask as ``full(-inf).scatter_(-1, idx, 0)``,
the Compressor's softmax pool over (overlapping) windows and Sinkhorn as a loop of normalisations.

Every layer attends, with one shared K = V head, to the local keys of a sliding window; compressed
layers also see keys pooled over windows of ``compress_ratio`` tokens (ratio 4: an Indexer keeps the
top-k pooled keys per query). The residual stream is ``hc_mult`` copies mixed by Hyper-Connections.

Shapes: B batch, S tokens, H heads, D ``head_dim``, R ``qk_rope_head_dim``, P pooled keys
(S // ratio), T keys (S, or S + P), M ``hc_mult`` streams, C ``hidden_size``, Hi/Di indexer
heads/head dim. Masks are additive fp32: [S, T] or [B, S, T].
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .common import (CheckpointError, PretrainedMixin, RMSNorm, apply_rope_interleaved, dequantize_fp8_blockwise,
                     read_safetensors, rope_freqs_cis, yarn_inv_freq)
from .deepseek_v32 import hadamard_transform_torch

SCORE_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
FP4_BLOCK = 32  # routed experts: one scale per 32 input columns
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _flash_compress_ratios() -> list[int]:
    """V4-Flash: two sliding layers, then ratio 4 (with indexer) and ratio 128 alternating."""
    return [0, 0] + [4 if i % 2 == 0 else 128 for i in range(2, 43)]


@dataclass
class DeepseekV4Config:
    """DeepSeek-V4 hyper-parameters under the released ``config.json`` names (V4-Flash by default).
    Unknown ``config.json`` keys are ignored by ``from_dict``. ``compress_ratios[i]`` is layer i's
    type: 0 sliding window only, 4 compressed with overlap pooling and indexer, else compressed."""
    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1  # K = V: one latent head shared by all query heads
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_lora_rank: int = 1024
    o_groups: int = 8
    sliding_window: int = 128
    compress_ratios: list = field(default_factory=_flash_compress_ratios)
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: Optional[dict] = field(default_factory=lambda: {
        "type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1})
    max_position_embeddings: int = 1048576
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    num_hash_layers: int = 3
    swiglu_limit: float = 10.0
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1  # MTP blocks stored as ``mtp.{k}.*``; not run here
    initializer_range: float = 0.02
    eos_token_id: Optional[int] = 1

    def __post_init__(self):
        self.compress_ratios = list(self.compress_ratios)
        problems = []
        if len(self.compress_ratios) < self.num_hidden_layers:
            problems.append(f"compress_ratios has {len(self.compress_ratios)} entries for "
                            f"{self.num_hidden_layers} layers")
        if any(r < 0 for r in self.compress_ratios):
            problems.append(f"compress_ratios must be >= 0, got {self.compress_ratios}")
        if self.num_key_value_heads != 1:
            problems.append(f"num_key_value_heads must be 1 (K = V is one shared head), got {self.num_key_value_heads}")
        if self.qk_rope_head_dim % 2 or not 0 < self.qk_rope_head_dim <= min(self.head_dim, self.index_head_dim):
            problems.append(f"qk_rope_head_dim {self.qk_rope_head_dim} must be even and fit head_dim and index_head_dim")
        if self.num_attention_heads % self.o_groups:
            problems.append(f"num_attention_heads {self.num_attention_heads} not divisible by o_groups {self.o_groups}")
        if self.index_head_dim & (self.index_head_dim - 1):
            problems.append(f"index_head_dim must be a power of 2 (Hadamard), got {self.index_head_dim}")
        if self.scoring_func not in SCORE_FUNCS:
            problems.append(f"scoring_func must be one of {SCORE_FUNCS}, got {self.scoring_func!r}")
        if self.hc_sinkhorn_iters < 1:
            problems.append(f"hc_sinkhorn_iters must be >= 1, got {self.hc_sinkhorn_iters}")
        if problems:
            raise ValueError("invalid DeepseekV4Config: " + "; ".join(problems))

    @classmethod
    def tiny(cls, **overrides) -> "DeepseekV4Config":
        """A ~200k-parameter preset for tests: layer 0 sliding (hash-routed MoE), layer 1 ratio 4 with
        indexer, layer 2 ratio 128; window 8; YaRN active on the compressed layers."""
        kw = dict(vocab_size=128, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=3,
                  num_attention_heads=4, head_dim=32, qk_rope_head_dim=8, q_lora_rank=32, o_lora_rank=16, o_groups=2,
                  sliding_window=8, compress_ratios=[0, 4, 128], max_position_embeddings=1024,
                  rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 64,
                                "beta_fast": 32, "beta_slow": 1},
                  index_n_heads=4, index_head_dim=16, index_topk=4, n_routed_experts=8, num_experts_per_tok=2,
                  num_hash_layers=1, num_nextn_predict_layers=0, initializer_range=0.1)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_dict(cls, d: dict) -> "DeepseekV4Config":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return {"model_type": "deepseek_v4", "architectures": ["DeepseekV4ForCausalLM"], **dataclasses.asdict(self)}

    @property
    def layer_types(self) -> list[str]:
        """Per layer: ``sliding_attention``, ``compressed_sparse_attention`` (ratio 4, indexer) or
        ``heavily_compressed_attention`` (any other ratio)."""
        names = {0: "sliding_attention", 4: "compressed_sparse_attention"}
        return [names.get(r, "heavily_compressed_attention") for r in self.compress_ratios[:self.num_hidden_layers]]

    def inv_freq(self, compressed: bool, device=None) -> torch.Tensor:
        """RoPE inverse frequencies [R/2]: ``rope_theta`` on sliding layers; ``compress_rope_theta``
        with YaRN (whenever ``rope_scaling`` is YaRN) on compressed layers, for all their keys."""
        rs = self.rope_scaling
        if not compressed:
            return yarn_inv_freq(self.qk_rope_head_dim, self.rope_theta, device=device)
        if rs and rs.get("type", rs.get("rope_type")) == "yarn" and rs.get("original_max_position_embeddings", 0) > 0:
            return yarn_inv_freq(self.qk_rope_head_dim, self.compress_rope_theta, rs["factor"],
                                 rs["original_max_position_embeddings"], rs.get("beta_fast", 32),
                                 rs.get("beta_slow", 1), device=device)
        return yarn_inv_freq(self.qk_rope_head_dim, self.compress_rope_theta, device=device)


@dataclass
class DeepseekV4CausalLMOutput:
    loss: Optional[torch.Tensor] = None    # scalar next-token cross-entropy
    logits: Optional[torch.Tensor] = None  # [B, S, vocab] fp32


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
def apply_partial_rope(x: torch.Tensor, freqs_cis: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Interleaved RoPE on the last R dims only, the rest passes through; ``inverse`` rotates back
    (by -angle): [B, S, H, D], complex [S, R/2] -> [B, S, H, D]."""
    rd = 2 * freqs_cis.shape[-1]
    rope = apply_rope_interleaved(x[..., -rd:], freqs_cis.conj() if inverse else freqs_cis)
    return torch.cat([x[..., :-rd], rope], dim=-1)


def sliding_window_mask(S: int, window: int, device=None) -> torch.Tensor:
    """Query i sees keys max(0, i - window + 1) .. i: additive [S, S]."""
    i = torch.arange(S, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    allowed = (j <= i) & (j > i - window)
    return torch.zeros(S, S, device=device).masked_fill(~allowed, float("-inf"))


def compressed_causal_mask(S: int, P: int, ratio: int, device=None) -> torch.Tensor:
    """Pooled key p (tokens p*ratio .. p*ratio + ratio - 1) is visible to query i once its window is
    complete, p < (i + 1) // ratio: additive [S, P]."""
    future = torch.arange(P, device=device)[None, :] >= torch.arange(1, S + 1, device=device)[:, None] // ratio
    return torch.where(future, float("-inf"), 0.0)


def sink_attention(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, mask: torch.Tensor,
                   softmax_scale: float) -> torch.Tensor:
    """Multi-query attention with K = V and a per-head sink logit: the sink is an extra softmax
    column that takes probability mass and adds no value.

    q [B, S, H, D], kv [B, T, D], sink [H], mask [S, T] or [B, S, T] additive -> [B, S, H, D].
    """
    B, S, H, _ = q.shape
    scores = torch.einsum("bhsd,btd->bhst", q.transpose(1, 2).float(), kv.float()) * softmax_scale
    scores = scores + (mask.unsqueeze(-3) if mask.dim() == 3 else mask)
    sink_col = sink.float().view(1, H, 1, 1).expand(B, H, S, 1)
    probs = torch.cat([scores, sink_col], dim=-1).softmax(dim=-1, dtype=torch.float32)[..., :-1]
    return torch.einsum("bhst,btd->bhsd", probs.type_as(kv), kv).transpose(1, 2)


def overlap_transform(t: torch.Tensor, fill: float) -> torch.Tensor:
    """[B, P, r, 2d] -> [B, P, 2r, d]: window n's slots r.. hold the second feature half of its own
    r tokens, slots ..r the first half of window n - 1's tokens (``fill`` for window 0)."""
    B, P, r, two_d = t.shape
    d = two_d // 2
    out = t.new_full((B, P, 2 * r, d), fill)
    out[:, :, r:] = t[..., d:]
    out[:, 1:, :r] = t[:, :-1, :, :d]
    return out


def sinkhorn_normalize(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """[..., M, M] logits -> a doubly stochastic matrix: row softmax (+eps), a column normalisation,
    then ``iters - 1`` rounds of row and column normalisation (each divisor +eps)."""
    comb = logits.softmax(dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def hc_split_sinkhorn(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_mult: int, iters: int,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hyper-Connection weights from the mixer output [..., (2 + M) * M], ``scale`` [3], ``base``
    [(2 + M) * M] -> (pre [..., M] = sigmoid + eps, post [..., M] = 2 sigmoid, comb [..., M, M]
    doubly stochastic; comb[i, j] carries stream i into stream j)."""
    M = hc_mult
    pre = torch.sigmoid(mixes[..., :M] * scale[0] + base[:M]) + eps
    post = 2 * torch.sigmoid(mixes[..., M:2 * M] * scale[1] + base[M:2 * M])
    comb = mixes[..., 2 * M:].unflatten(-1, (M, M)) * scale[2] + base[2 * M:].view(M, M)
    return pre, post, sinkhorn_normalize(comb, iters, eps)


def _hc_mixes(x: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """The mixer of the RMS-normalised flattened streams, fp32: [B, S, M, C] -> [B, S, fn rows]."""
    x = x.flatten(2).float()
    return F.linear(x, fn.float()) * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


# --------------------------------------------------------------------------------------------
# Attention: sliding window + Compressor + Indexer + sink, grouped low-rank output
# --------------------------------------------------------------------------------------------
class DeepseekV4Compressor(nn.Module):
    """Pools the sequence into one key per complete window of ``ratio`` tokens: a softmax over the
    window of the gate (plus a learned per-slot bias ``ape``) weights the projected tokens. Ratio 4
    pools overlapping windows (each also covers the previous window's tokens, with the other half
    of the 2 * head_dim projection). ``rotate``: the indexer's Hadamard rotation."""

    def __init__(self, config: DeepseekV4Config, compress_ratio: int, head_dim: int, rotate: bool = False):
        super().__init__()
        self.compress_ratio, self.head_dim, self.rotate = compress_ratio, head_dim, rotate
        self.overlap = compress_ratio == 4
        width = (1 + self.overlap) * head_dim
        self.ape = nn.Parameter(torch.empty(compress_ratio, width))
        self.wkv = nn.Linear(config.hidden_size, width, bias=False)
        self.wgate = nn.Linear(config.hidden_size, width, bias=False)
        self.norm = RMSNorm(head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """x [B, S, C], freqs_cis [S, R/2] -> pooled keys [B, P, head_dim], P = S // ratio (an
        incomplete trailing window is not pooled), roped at positions p * ratio."""
        r = self.compress_ratio
        P = x.shape[1] // r
        # fp32 projections and pool, as in the reference (the weights are stored in fp32).
        xw = x[:, :P * r].float()
        kv = F.linear(xw, self.wkv.weight.float()).unflatten(1, (P, r))                          # [B, P, r, w]
        score = F.linear(xw, self.wgate.weight.float()).unflatten(1, (P, r)) + self.ape.float()
        if self.overlap:
            kv, score = overlap_transform(kv, 0.0), overlap_transform(score, float("-inf"))   # [B, P, 2r, d]
        pooled = (kv * score.softmax(dim=2)).sum(dim=2)
        pooled = self.norm(pooled.to(x.dtype))
        pooled = apply_partial_rope(pooled.unsqueeze(2), freqs_cis[:P * r:r]).squeeze(2)
        if self.rotate:
            pooled = hadamard_transform_torch(pooled, self.head_dim ** -0.5)
        return pooled


class DeepseekV4Indexer(nn.Module):
    """Scores every pooled key for every query with a ReLU multi-head dot product over its own
    (rotated) pool and keeps the top ``index_topk``."""

    def __init__(self, config: DeepseekV4Config, compress_ratio: int = 4):
        super().__init__()
        self.n_heads, self.head_dim, self.index_topk = config.index_n_heads, config.index_head_dim, config.index_topk
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)
        self.compressor = DeepseekV4Compressor(config, compress_ratio, self.head_dim, rotate=True)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, freqs_cis: torch.Tensor,
                causal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, C], qr [B, S, q_lora_rank], freqs_cis [S, R/2], causal [S, P] (the pooled-key
        visibility mask) -> (top-k pooled indices [B, S, min(index_topk, P)], scores [B, S, P] fp32)."""
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
        # The Hadamard rotation (on q and the pooled keys) keeps q·k; it is there for fp4 activations.
        q = hadamard_transform_torch(apply_partial_rope(q, freqs_cis), self.head_dim ** -0.5)
        k = self.compressor(x, freqs_cis)
        weights = self.weights_proj(x).float() * (self.head_dim ** -0.5 * self.n_heads ** -0.5)
        logits = torch.einsum("bshd,btd->bsht", q.float(), k.float())
        scores = (torch.relu(logits) * weights.unsqueeze(-1)).sum(dim=2) + causal
        return scores.topk(min(self.index_topk, k.shape[1]), dim=-1)[1], scores


class DeepseekV4Attention(nn.Module):
    """Shared-KV multi-query attention over a sliding window (plus pooled keys on compressed
    layers) with a per-head sink; q RMS-normalised per head; partial interleaved RoPE on the last
    R dims of q and kv, undone on the output; grouped low-rank output projection."""

    def __init__(self, config: DeepseekV4Config, layer_idx: int):
        super().__init__()
        c = config
        self.n_heads, self.head_dim, self.eps = c.num_attention_heads, c.head_dim, c.rms_norm_eps
        self.n_groups, self.o_lora_rank, self.window = c.o_groups, c.o_lora_rank, c.sliding_window
        self.compress_ratio = c.compress_ratios[layer_idx]
        self.softmax_scale = c.head_dim ** -0.5
        self.attn_sink = nn.Parameter(torch.empty(c.num_attention_heads))
        self.wq_a = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
        self.wq_b = nn.Linear(c.q_lora_rank, c.num_attention_heads * c.head_dim, bias=False)
        self.wkv = nn.Linear(c.hidden_size, c.head_dim, bias=False)
        self.kv_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        # Block-diagonal: group g maps its H/G heads' outputs to its own o_lora_rank slice.
        self.wo_a = nn.Linear(c.num_attention_heads * c.head_dim // c.o_groups, c.o_groups * c.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(c.o_groups * c.o_lora_rank, c.hidden_size, bias=False)
        if self.compress_ratio:
            self.compressor = DeepseekV4Compressor(c, self.compress_ratio, c.head_dim)
            self.indexer = DeepseekV4Indexer(c, self.compress_ratio) if self.compress_ratio == 4 else None

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """x [B, S, C], freqs_cis [S, R/2] (this layer's RoPE) -> [B, S, C]."""
        B, S, _ = x.shape
        qr = self.q_norm(self.wq_a(x))
        q = self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim))
        q = q * torch.rsqrt(q.float().square().mean(-1, keepdim=True) + self.eps).to(q.dtype)
        q = apply_partial_rope(q, freqs_cis)
        kv = apply_partial_rope(self.kv_norm(self.wkv(x)).unsqueeze(2), freqs_cis).squeeze(2)  # [B, S, D]
        mask = sliding_window_mask(S, self.window, x.device)
        P = S // self.compress_ratio if self.compress_ratio else 0
        if P:
            pooled_mask = compressed_causal_mask(S, P, self.compress_ratio, x.device)
            if self.indexer is not None:
                topk, _ = self.indexer(x, qr, freqs_cis, pooled_mask)
                pooled_mask = torch.full((B, S, P), float("-inf"), device=x.device).scatter_(-1, topk, 0) + pooled_mask
            kv = torch.cat([kv, self.compressor(x, freqs_cis)], dim=1)                         # [B, S + P, D]
            mask = torch.cat([mask.expand(B, S, S), pooled_mask.expand(B, S, P)], dim=-1)
        o = sink_attention(q, kv, self.attn_sink, mask, self.softmax_scale)
        o = apply_partial_rope(o, freqs_cis, inverse=True).reshape(B, S, self.n_groups, -1)
        wo_a = self.wo_a.weight.view(self.n_groups, self.o_lora_rank, -1)
        return self.wo_b(torch.einsum("bsgd,grd->bsgr", o, wo_a).flatten(2))


# --------------------------------------------------------------------------------------------
# MoE: sqrt-softplus scores, hash routing on the first layers, clamped SwiGLU
# --------------------------------------------------------------------------------------------
class DeepseekV4Expert(nn.Module):
    """SwiGLU with ``w1`` gate, ``w3`` up, ``w2`` down; the gate is clamped above and the up
    projection both ways at ``swiglu_limit`` (> 0): [N, C] -> [N, C]."""

    def __init__(self, dim: int, inter_dim: int, swiglu_limit: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)
        self.swiglu_limit = swiglu_limit

    def forward(self, x: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        gate, up = self.w1(x).float(), self.w3(x).float()
        if self.swiglu_limit > 0:
            gate = gate.clamp(max=self.swiglu_limit)
            up = up.clamp(-self.swiglu_limit, self.swiglu_limit)
        h = F.silu(gate) * up
        if weights is not None:  # the routing weight is applied before w2, as in the reference
            h = weights * h
        return self.w2(h.to(x.dtype))


class DeepseekV4Gate(nn.Module):
    """Router. Scores by ``scoring_func`` (sqrtsoftplus: sqrt(softplus(logit))); hash layers take
    their experts from the token id (``tid2eid`` [vocab, top_k]), the others the top-k of
    score + ``bias`` (choice only). Weights: the chosen scores, renormalised unless softmax, times
    ``routed_scaling_factor``."""

    def __init__(self, config: DeepseekV4Config, layer_idx: int):
        super().__init__()
        c = config
        self.top_k, self.score_func, self.route_scale = c.num_experts_per_tok, c.scoring_func, c.routed_scaling_factor
        self.hash = layer_idx < c.num_hash_layers
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size))
        if self.hash:
            table = torch.rand(c.vocab_size, c.n_routed_experts).argsort(dim=-1)[:, :c.num_experts_per_tok]
            self.register_buffer("tid2eid", table.to(torch.int32))
        else:
            self.register_buffer("bias", torch.zeros(c.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, C], input_ids [N] -> (weights fp32 [N, top_k], expert indices [N, top_k])."""
        scores = F.linear(x.float(), self.weight.float())
        if self.score_func == "softmax":
            scores = scores.softmax(dim=-1)
        elif self.score_func == "sigmoid":
            scores = scores.sigmoid()
        else:
            scores = F.softplus(scores).sqrt()
        if self.hash:
            indices = self.tid2eid[input_ids].long()
        else:
            indices = (scores + self.bias.float()).topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, indices)
        if self.score_func != "softmax":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.route_scale, indices


class DeepseekV4MoE(nn.Module):
    """Routed experts plus always-on shared experts: [B, S, C], ids [B, S] -> [B, S, C]. Experts
    run one at a time on their tokens (the reference loop); a grouped-GEMM rewrite replaces it."""

    def __init__(self, config: DeepseekV4Config, layer_idx: int):
        super().__init__()
        c = config
        self.gate = DeepseekV4Gate(c, layer_idx)
        self.experts = nn.ModuleList(DeepseekV4Expert(c.hidden_size, c.moe_intermediate_size, c.swiglu_limit)
                                     for _ in range(c.n_routed_experts))
        self.shared_experts = DeepseekV4Expert(c.hidden_size, c.n_shared_experts * c.moe_intermediate_size,
                                               c.swiglu_limit) if c.n_shared_experts else None

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices = self.gate(x, input_ids.reshape(-1))
        y = torch.zeros_like(x, dtype=torch.float32)
        counts = torch.bincount(indices.flatten(), minlength=len(self.experts)).tolist()
        for i, expert in enumerate(self.experts):
            if counts[i] == 0:
                continue
            token, slot = torch.where(indices == i)
            y.index_add_(0, token, expert(x[token], weights[token, slot, None]).float())
        if self.shared_experts is not None:
            y = y + self.shared_experts(x).float()
        return y.type_as(x).view(shape)


# --------------------------------------------------------------------------------------------
# Blocks with Hyper-Connections, the model
# --------------------------------------------------------------------------------------------
class DeepseekV4Block(nn.Module):
    """Attention then MoE, each wrapped in a Hyper-Connection over the M residual streams:
    collapse the streams with ``pre``, run the sub-layer on the normed collapse, write back with
    x'_j = post_j * out + sum_i comb[i, j] * x_i."""

    def __init__(self, config: DeepseekV4Config, layer_idx: int):
        super().__init__()
        c = config
        self.hc_mult, self.hc_sinkhorn_iters, self.hc_eps, self.norm_eps = (c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps,
                                                                            c.rms_norm_eps)
        self.attn = DeepseekV4Attention(c, layer_idx)
        self.ffn = DeepseekV4MoE(c, layer_idx)
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.ffn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        mix = (2 + c.hc_mult) * c.hc_mult
        self.hc_attn_fn = nn.Parameter(torch.empty(mix, c.hc_mult * c.hidden_size))
        self.hc_ffn_fn = nn.Parameter(torch.empty(mix, c.hc_mult * c.hidden_size))
        self.hc_attn_base = nn.Parameter(torch.empty(mix))
        self.hc_ffn_base = nn.Parameter(torch.empty(mix))
        self.hc_attn_scale = nn.Parameter(torch.empty(3))
        self.hc_ffn_scale = nn.Parameter(torch.empty(3))

    def hc_pre(self, x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor):
        """x [B, S, M, C] -> (collapsed [B, S, C], post [B, S, M], comb [B, S, M, M])."""
        pre, post, comb = hc_split_sinkhorn(_hc_mixes(x, fn, self.norm_eps), scale.float(), base.float(),
                                            self.hc_mult, self.hc_sinkhorn_iters, self.hc_eps)
        return (pre.unsqueeze(-1) * x.float()).sum(dim=2).to(x.dtype), post, comb

    @staticmethod
    def hc_post(out: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """out [B, S, C], residual [B, S, M, C] -> [B, S, M, C] (fp32 math)."""
        mixed = torch.einsum("bsij,bsic->bsjc", comb, residual.float())
        return (post.unsqueeze(-1) * out.float().unsqueeze(-2) + mixed).type_as(out)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """x [B, S, M, C], freqs_cis [S, R/2], input_ids [B, S] -> [B, S, M, C]."""
        h, post, comb = self.hc_pre(x, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base)
        x = self.hc_post(self.attn(self.attn_norm(h), freqs_cis), x, post, comb)
        h, post, comb = self.hc_pre(x, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base)
        return self.hc_post(self.ffn(self.ffn_norm(h), input_ids), x, post, comb)


class DeepseekV4ForCausalLM(PretrainedMixin, nn.Module):
    """DeepSeek-V4 language model, parameters named as in the released checkpoint: ``embed``,
    ``layers``, ``hc_head_{fn,base,scale}`` (the HyperHead), ``norm``, ``head``."""

    config_class = DeepseekV4Config

    def __init__(self, config: DeepseekV4Config):
        super().__init__()
        c = config
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DeepseekV4Block(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.hc_head_fn = nn.Parameter(torch.empty(c.hc_mult, c.hc_mult * c.hidden_size))
        self.hc_head_base = nn.Parameter(torch.empty(c.hc_mult))
        self.hc_head_scale = nn.Parameter(torch.empty(1))
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # Norm weights keep their ones, mixer gains start at 1, everything else ~ N(0, std).
        for name, p in self.named_parameters():
            if name.endswith("_scale"):
                p.fill_(1.0)
            elif not name.endswith("norm.weight"):
                p.normal_(std=self.config.initializer_range)

    def hc_head(self, x: torch.Tensor) -> torch.Tensor:
        """HyperHead: the M streams collapsed by sigmoid weights (no Sinkhorn): [B, S, M, C] -> [B, S, C]."""
        mixes = _hc_mixes(x, self.hc_head_fn, self.config.rms_norm_eps)
        pre = torch.sigmoid(mixes * self.hc_head_scale.float() + self.hc_head_base.float()) + self.config.hc_eps
        return (pre.unsqueeze(-1) * x.float()).sum(dim=2).to(x.dtype)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> DeepseekV4CausalLMOutput:
        """input_ids [B, S]; labels [B, S] (-100 ignored, shifted inside) -> logits [B, S, vocab], loss."""
        c, S = self.config, input_ids.shape[1]
        positions = torch.arange(S, device=input_ids.device)
        freqs = {compressed: rope_freqs_cis(c.inv_freq(compressed, input_ids.device), positions)
                 for compressed in (False, True)}
        h = self.embed(input_ids).unsqueeze(2).repeat(1, 1, c.hc_mult, 1)  # [B, S, M, C]
        for layer in self.layers:
            h = layer(h, freqs[bool(layer.attn.compress_ratio)], input_ids)
        logits = self.head(self.norm(self.hc_head(h))).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return DeepseekV4CausalLMOutput(loss=loss, logits=logits)

    @classmethod
    def read_checkpoint(cls, path: str, dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
        return load_released_safetensors(path, dtype)  # fp8 / fp4 weights with ``.scale`` dequantised


# --------------------------------------------------------------------------------------------
# Released checkpoint quantisation: fp8 e4m3 (128x128 blocks) and fp4 e2m1 experts, ``.scale`` keys
# --------------------------------------------------------------------------------------------
def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """fp4 e2m1 pairs packed in bytes (low nibble first) [O, I/2] with one scale per 32 columns
    [O, I/32] -> ``dtype`` [O, I]."""
    nibbles = packed.view(torch.uint8)
    table = torch.tensor(FP4_E2M1, device=packed.device)
    values = torch.stack([table[(nibbles & 0xF).long()], table[(nibbles >> 4).long()]], dim=-1).flatten(-2)
    return (values * scale.float().repeat_interleave(FP4_BLOCK, dim=-1)[:, :values.shape[-1]]).to(dtype)


def load_released_safetensors(path: str, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (index shards or one ``model.safetensors``); a
    ``<name>.weight`` with a ``<name>.scale`` is dequantised to ``dtype`` (default: torch's): fp8
    with 128x128 block scales, int8 / float4_e2m1fn_x2 as packed fp4 with 32-column scales."""
    state = read_safetensors(path)
    target = dtype or torch.get_default_dtype()
    for key in [k for k in state if k.endswith(".scale") and k[:-len("scale")] + "weight" in state]:
        scale, weight_key = state.pop(key), key[:-len("scale")] + "weight"
        weight = state[weight_key]
        if weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            state[weight_key] = dequantize_fp8_blockwise(weight, scale, dtype=target)
        elif weight.dtype in (torch.int8, torch.uint8, torch.float4_e2m1fn_x2):
            state[weight_key] = dequantize_fp4(weight, scale, dtype=target)
        else:
            raise CheckpointError(f"{weight_key!r} has a {key!r} but dtype {weight.dtype}: expected fp8 or "
                                  f"packed fp4")
    return state
