"""Pieces shared by the plain-eager reference models: norms, YaRN RoPE, MLP / MoE and safetensors
checkpoints in the Hugging Face layout.

Plain torch only (no dsgraph imports): these are the eager forms that dsgraph's passes look for.
Shapes: B batch, S query length, T key length, H heads, D head dim, N tokens (B*S).
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

FP8_BLOCK = 128
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


# --------------------------------------------------------------------------------------------
# Norms
# --------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back: [..., dim] -> [..., dim]."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x).to(dtype)


class LayerNorm(nn.Module):
    """LayerNorm with bias, fp32 math (the DeepSeek indexer's ``k_norm``): [..., dim] -> [..., dim]."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps).type_as(x)


# --------------------------------------------------------------------------------------------
# RoPE (YaRN)
# --------------------------------------------------------------------------------------------
def yarn_inv_freq(dim: int, base: float, factor: float = 1.0, original_seq_len: Optional[int] = None,
                  beta_fast: float = 32, beta_slow: float = 1, device=None) -> torch.Tensor:
    """Inverse RoPE frequencies [dim // 2], YaRN-blended when ``original_seq_len`` is given.

    Dimensions that rotate more than ``beta_fast`` times over the original context keep their
    frequency, those under ``beta_slow`` rotations are divided by ``factor``, linear ramp between.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    if original_seq_len is None:
        return inv_freq

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 where the frequency is kept (high-frequency dims)
    return inv_freq / factor * (1 - keep) + inv_freq * keep


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_freqs_cis(inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Complex rotations e^{i * pos * inv_freq}: [S], [R/2] -> complex64 [S, R/2]."""
    angles = torch.outer(positions.float(), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope_interleaved(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """RoPE on adjacent pairs (2k, 2k+1), as a complex multiply: [B, S, H, R], [S, R/2] -> [B, S, H, R]."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    y = torch.view_as_real(xc * freqs_cis.view(1, x.size(1), 1, -1)).flatten(3)
    return y.to(x.dtype)


def apply_rope_half(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Non-interleaved ("rotate half") RoPE on pairs (k, k + R/2): [B, S, H, R], [S, R/2] -> [B, S, H, R]."""
    pairs = x.float().unflatten(-1, (2, -1)).transpose(-1, -2).contiguous()  # [..., R/2, 2]
    y = torch.view_as_real(torch.view_as_complex(pairs) * freqs_cis.view(1, x.size(1), 1, -1))
    return torch.cat([y[..., 0], y[..., 1]], dim=-1).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Feed-forward
# --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """SwiGLU feed-forward (HF names ``gate_proj``/``up_proj``/``down_proj``): [..., dim] -> [..., dim]."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj((F.silu(self.gate_proj(x).float()) * self.up_proj(x).float()).type_as(x))


class MoEGate(nn.Module):
    """DeepSeek-V3 router: sigmoid (or softmax) scores, ``e_score_correction_bias`` used for the choice
    only, group-limited top-k (best ``topk_group`` of ``n_group`` groups, a group scored by the sum of
    its two best experts), weights renormalised and scaled by ``route_scale``."""

    def __init__(self, dim: int, n_experts: int, top_k: int, n_group: int = 1, topk_group: int = 1,
                 route_scale: float = 1.0, norm_topk_prob: bool = True, score_func: str = "sigmoid"):
        super().__init__()
        if score_func not in ("sigmoid", "softmax"):
            raise ValueError(f"score_func must be 'sigmoid' or 'softmax', got {score_func!r}")
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.route_scale, self.norm_topk_prob, self.score_func = route_scale, norm_topk_prob, score_func
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
        nn.init.normal_(self.weight, std=dim**-0.5)
        # Load-balancing bias: updated outside the optimiser, so a buffer (saved with the weights).
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, dim] -> (weights fp32 [N, top_k], expert indices [N, top_k])."""
        scores = F.linear(x.float(), self.weight.float())
        scores = scores.sigmoid() if self.score_func == "sigmoid" else scores.softmax(dim=-1)
        original_scores = scores
        scores = scores + self.e_score_correction_bias.float()
        if self.n_group > 1:
            scores = scores.view(x.size(0), self.n_group, -1)
            group_scores = scores.topk(2, dim=-1)[0].sum(dim=-1)
            groups = group_scores.topk(self.topk_group, dim=-1)[1]
            drop = scores.new_ones(x.size(0), self.n_group, dtype=torch.bool).scatter_(1, groups, False)
            scores = scores.masked_fill(drop.unsqueeze(-1), float("-inf")).flatten(1)
        indices = scores.topk(self.top_k, dim=-1)[1]
        weights = original_scores.gather(1, indices)
        if self.norm_topk_prob and self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.route_scale, indices


class MoE(nn.Module):
    """Routed SwiGLU experts plus always-on shared experts (HF names ``gate``, ``experts.{j}``,
    ``shared_experts``): [B, S, dim] -> [B, S, dim].

    Experts run one at a time on the tokens routed to them (the official loop); a grouped-GEMM
    rewrite replaces it."""

    def __init__(self, dim: int, moe_inter_dim: int, n_routed_experts: int, n_shared_experts: int,
                 top_k: int, n_group: int = 1, topk_group: int = 1, route_scale: float = 1.0,
                 norm_topk_prob: bool = True, score_func: str = "sigmoid"):
        super().__init__()
        self.gate = MoEGate(dim, n_routed_experts, top_k, n_group, topk_group, route_scale, norm_topk_prob,
                            score_func)
        self.experts = nn.ModuleList(MLP(dim, moe_inter_dim) for _ in range(n_routed_experts))
        self.shared_experts = MLP(dim, n_shared_experts * moe_inter_dim) if n_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, indices = self.gate(x)
        y = torch.zeros_like(x, dtype=torch.float32)
        counts = torch.bincount(indices.flatten(), minlength=len(self.experts)).tolist()
        for i, expert in enumerate(self.experts):
            if counts[i] == 0:
                continue
            token, slot = torch.where(indices == i)
            y.index_add_(0, token, expert(x[token]).float() * weights[token, slot, None])
        if self.shared_experts is not None:
            y = y + self.shared_experts(x).float()
        return y.type_as(x).view(shape)


# --------------------------------------------------------------------------------------------
# Checkpoints (Hugging Face layout: config.json + safetensors, optionally sharded with an index)
# --------------------------------------------------------------------------------------------
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint does not match the model: names the missing, unexpected and mis-shaped keys."""


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {k}" for k in items[:limit]) + more


def dequantize_fp8_blockwise(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK,
                             dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """fp8 weight [O, I] with per-block scales [ceil(O/block), ceil(I/block)] -> ``dtype`` [O, I]
    (DeepSeek's ``weight_scale_inv``: the stored scale multiplies the fp8 value)."""
    out_f, in_f = weight.shape
    scale = scale_inv.float().repeat_interleave(block, 0)[:out_f].repeat_interleave(block, 1)[:, :in_f]
    return (weight.float() * scale).to(dtype)


def read_config(path: str) -> dict:
    with open(os.path.join(path, CONFIG_NAME)) as f:
        return json.load(f)


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor, as stored, of a checkpoint directory (index shards or one ``model.safetensors``)."""
    index_file = os.path.join(path, INDEX_NAME)
    if os.path.exists(index_file):
        with open(index_file) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, WEIGHTS_NAME)):
        files = [WEIGHTS_NAME]
    else:
        raise CheckpointError(f"no {INDEX_NAME} or {WEIGHTS_NAME} in {path}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            state.update({key: f.get_tensor(key) for key in f.keys()})
    return state


def load_safetensors(path: str, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (``model.safetensors.index.json`` shards or one
    ``model.safetensors``), fp8 weights dequantised to ``dtype`` (default: torch's) with their
    ``*.weight_scale_inv`` blocks."""
    state = read_safetensors(path)
    target = dtype or torch.get_default_dtype()
    for key in [k for k, t in state.items() if t.dtype in FP8_DTYPES]:
        scale = state.pop(key + "_scale_inv", None)
        if scale is None:
            raise CheckpointError(f"fp8 tensor {key!r} has no {key + '_scale_inv'!r} block scales: "
                                  f"only block-{FP8_BLOCK} fp8 checkpoints (DeepSeek layout) can be dequantised")
        state[key] = dequantize_fp8_blockwise(state[key], scale, dtype=target)
    return state


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], dtype: Optional[torch.dtype] = None,
                      device=None, ignore: Optional[str] = None, source: str = "checkpoint") -> None:
    """Load ``state`` into ``model`` (possibly built on the meta device) by assignment, after checking
    names and shapes; keys matching the regex ``ignore`` are dropped. Raises CheckpointError listing
    every missing, unexpected and mis-shaped key."""
    if ignore is not None:
        state = {k: v for k, v in state.items() if not re.match(ignore, k)}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        parts = [_listing(t, v) for t, v in (("missing keys", missing), ("unexpected keys", unexpected),
                                              ("shape mismatches", mismatched)) if v]
        raise CheckpointError(f"{source} does not match {type(model).__name__}:\n" + "\n".join(parts))
    dtype = dtype or torch.get_default_dtype()
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)


def save_safetensors(model: nn.Module, path: str, config: dict, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write ``config.json`` and the state dict as ``model-0000i-of-0000n.safetensors`` shards of at
    most ``max_shard_bytes`` (a larger tensor gets its own shard) plus ``model.safetensors.index.json``."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in model.state_dict().items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.detach().contiguous().cpu()
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    with open(os.path.join(path, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


class PretrainedMixin:
    """``from_pretrained`` / ``save_pretrained`` over ``config.json`` + (sharded) safetensors under the
    released parameter names. A model sets ``config_class`` and may override ``read_checkpoint``
    (dequantisation) and ``ignored_keys`` (a regex of checkpoint keys the model has no module for)."""

    config_class: type

    @classmethod
    def read_checkpoint(cls, path: str, dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
        return load_safetensors(path, dtype)

    @classmethod
    def ignored_keys(cls, config) -> Optional[str]:
        return r"mtp\."  # multi-token-prediction weights

    @classmethod
    def from_pretrained(cls, path: str, config=None, dtype: Optional[torch.dtype] = None, device=None):
        """Load a checkpoint directory; ``config`` overrides ``config.json``; floating tensors become
        ``dtype`` (default: torch's default dtype). Raises ``CheckpointError`` naming missing,
        unexpected and mis-shaped keys."""
        config = config or cls.config_class.from_dict(read_config(path))
        state = cls.read_checkpoint(path, dtype)
        with torch.device("meta"):
            model = cls(config)
        load_state_strict(model, state, dtype, device, cls.ignored_keys(config), source=path)
        return model

    def save_pretrained(self, path: str, max_shard_size: int = 5 * 2**30) -> None:
        """Write ``config.json``, ``model-*-of-*.safetensors`` shards and ``model.safetensors.index.json``."""
        save_safetensors(self, path, self.config.to_dict(), max_shard_size)


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                    attention_mask: Optional[torch.Tensor], eos_token_id: Optional[int]) -> torch.Tensor:
    """Greedy decoding through a causal LM's cache (``model(ids, attention_mask=, past_key_values=,
    use_cache=True)`` returning ``logits`` and ``past_key_values``): [B, S] -> [B, S + n],
    n <= max_new_tokens; rows that produced ``eos_token_id`` are padded with it until every row has."""
    out = model(input_ids, attention_mask=attention_mask, use_cache=True)
    tokens = input_ids
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(dim=-1)
        if eos_token_id is not None:
            nxt = torch.where(done, eos_token_id, nxt)
            done |= nxt == eos_token_id
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        out = model(nxt[:, None], attention_mask=attention_mask, past_key_values=out.past_key_values, use_cache=True)
    return tokens
