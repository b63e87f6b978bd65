"""Nemotron V3 (Nemotron-H hybrid: Mamba2 / attention / MLP / MoE blocks) as a plain-eager PyTorch reference.

Computes what Hugging Face's ``NemotronHForCausalLM`` computes, with its checkpoint names (``backbone.*``,
``lm_head``) and ``config.json`` keys, on any device: the Mamba2 scan is the chunked SSD algorithm in plain
torch, and mamba-ssm's Triton kernels (``pip install dsgraph[mamba]``) are used instead only where they
import and the tensors are on a GPU. It is written in the forms dsgraph's passes look for, so keep them:
the SSD as segment sums (cumsum + masked ``tril``), ``exp`` decays and einsums with the groups expanded by
``repeat_interleave``; the gated RMSNorm per group; attention as einsum + fp32 ``softmax`` with the causal
mask ``full(-inf).triu(P + 1)``.

Shapes: B batch, S new tokens, P cached tokens, T = P + S keys, D hidden size; Mamba2: H heads of P_h
(``mamba_head_dim``) channels, G groups sharing B/C, N state size, K conv kernel, L = S; attention: Hq query
heads, Hkv key/value heads, Dh head dim.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import logging
import math
import sys
import types
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .common import MoE, MoEGate, PretrainedMixin, RMSNorm, greedy_generate

logger = logging.getLogger("dsgraph.models")

BLOCK_TYPES = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
# config.json ``layers_block_type`` spellings (newer HF configs) -> pattern characters.
_BLOCK_NAMES = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "mlp": "-",
                "moe": "E"}


@dataclass
class NemotronV3Config:
    """Nemotron-H hyper-parameters under their Hugging Face ``config.json`` names; the defaults are those of
    NVIDIA-Nemotron-3-Nano-30B-A3B. ``from_dict`` ignores unknown keys and accepts ``layers_block_type``
    in place of ``hybrid_override_pattern``."""
    vocab_size: int = 131072
    hidden_size: int = 2688
    hybrid_override_pattern: str = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
    layer_norm_epsilon: float = 1e-5
    # attention ('*')
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128
    attention_bias: bool = False
    # dense MLP ('-')
    intermediate_size: int = 1856
    mlp_bias: bool = False
    mlp_hidden_act: str = "relu2"
    # Mamba2 mixer ('M')
    mamba_num_heads: int = 64
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    use_bias: bool = False  # in_proj / out_proj
    mamba_hidden_act: str = "silu"
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    time_step_min: float = 0.001  # dt_bias initialisation range, not a limit
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    use_mamba_kernels: bool = True
    # MoE ('E')
    n_routed_experts: int = 128
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 1856
    moe_shared_expert_intermediate_size: int = 3712
    moe_latent_size: Optional[int] = None
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    eos_token_id: Optional[int] = 2

    def __post_init__(self):
        self.time_step_limit = tuple(self.time_step_limit)
        bad = set(self.hybrid_override_pattern) - set(BLOCK_TYPES)
        if bad or not self.hybrid_override_pattern:
            raise ValueError(f"hybrid_override_pattern must be a non-empty string of {''.join(BLOCK_TYPES)}, "
                             f"got {self.hybrid_override_pattern!r}")
        for name, n, d in (("mamba_num_heads", self.mamba_num_heads, self.n_groups),
                           ("num_attention_heads", self.num_attention_heads, self.num_key_value_heads),
                           ("n_routed_experts", self.n_routed_experts, self.n_group)):
            if n % d:
                raise ValueError(f"{name} {n} is not a multiple of {d}")
        unsupported = {"mlp_hidden_act": (self.mlp_hidden_act, "relu2"),
                       "mamba_hidden_act": (self.mamba_hidden_act, "silu"),
                       "moe_latent_size": (self.moe_latent_size, None),
                       "tie_word_embeddings": (self.tie_word_embeddings, False)}
        for name, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(f"{name}={value!r} is not supported by this reference (only {supported!r})")

    @classmethod
    def tiny(cls, **overrides) -> "NemotronV3Config":
        """A ~100k-parameter preset for tests with every block type (pattern ``M*-EM``), 2 groups of 2
        heads and a chunk of 8, so short sequences already span several chunks."""
        kw = dict(vocab_size=128, hidden_size=64, hybrid_override_pattern="M*-EM", num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, intermediate_size=96, mamba_num_heads=4, mamba_head_dim=16,
                  ssm_state_size=16, n_groups=2, chunk_size=8, n_routed_experts=8, num_experts_per_tok=2,
                  moe_intermediate_size=32, moe_shared_expert_intermediate_size=48, n_group=2, topk_group=1,
                  initializer_range=0.1)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_dict(cls, d: dict) -> "NemotronV3Config":
        d = dict(d)
        if "hybrid_override_pattern" not in d and "layers_block_type" in d:
            d["hybrid_override_pattern"] = "".join(_BLOCK_NAMES[t] for t in d["layers_block_type"])
        if isinstance(d.get("eos_token_id"), list):  # generation configs list several; greedy decode stops at the first
            d["eos_token_id"] = d["eos_token_id"][0]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return {"model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"],
                "num_hidden_layers": self.num_hidden_layers, **dataclasses.asdict(self)}

    @property
    def num_hidden_layers(self) -> int:
        return len(self.hybrid_override_pattern)

    @property
    def mamba_intermediate_size(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim


class Mamba2State(NamedTuple):
    """One Mamba2 layer's decode cache."""
    conv: torch.Tensor  # [B, I + 2GN, K - 1] the last K - 1 conv inputs (xBC before the conv)
    ssm: torch.Tensor   # [B, H, P_h, N] fp32 SSM state


class KVCache(NamedTuple):
    """One attention layer's decode cache of T positions."""
    k: torch.Tensor  # [B, T, Hkv, Dh]
    v: torch.Tensor  # [B, T, Hkv, Dh]


class NemotronV3Cache(NamedTuple):
    """Per-layer caches (``Mamba2State``, ``KVCache`` or None for MLP/MoE) and the number of tokens seen."""
    layers: tuple[Union[Mamba2State, KVCache, None], ...]
    length: int


@dataclass
class NemotronV3CausalLMOutput:
    loss: Optional[torch.Tensor] = None                 # scalar next-token cross-entropy
    logits: Optional[torch.Tensor] = None               # [B, S, vocab] fp32
    past_key_values: Optional[NemotronV3Cache] = None


# --------------------------------------------------------------------------------------------
# SSD (the Mamba2 scan): h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_tᵀ, y_t = C_t h_t + D x_t
# --------------------------------------------------------------------------------------------
def segsum(a: torch.Tensor) -> torch.Tensor:
    """Segment sums [..., T] -> [..., T, T]: out[i, j] = a[j+1] + ... + a[i] for j <= i, -inf above the
    diagonal, so ``exp(segsum(a))`` is the causal decay matrix. Built from a cumsum of a masked copy
    rather than a difference of cumsums, which cancels catastrophically."""
    T = a.size(-1)
    a = a[..., None].expand(*a.shape, T)  # a[..., i, j] = a_i
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    a = a.masked_fill(~below, 0)
    out = torch.cumsum(a, dim=-2)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~causal, float("-inf"))


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                chunk_size: int, D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                initial_states: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked SSD algorithm (Mamba2 paper, "minimal SSD"), in at least fp32.

    x [B, L, H, P_h], dt [B, L, H] (after softplus / limits), A [H] (negative), B and C [B, L, G, N]
    (head h uses group h // (H / G)), D [H], z [B, L, H, P_h] (output gate y * silu(z)), initial_states
    [B, H, P_h, N] -> (y [B, L, H, P_h] in x's dtype, final state [B, H, P_h, N] in at least fp32).
    Any L: the tail chunk is zero-padded, and dt = 0 there leaves the state unchanged.
    Same semantics as mamba-ssm's ``mamba_chunk_scan_combined`` with dt already discretised.
    """
    batch, L, H, _ = x.shape
    dtype = x.dtype
    ct = torch.promote_types(dtype, torch.float32)
    x_in = x
    x, dt, A, B, C = x.to(ct), dt.to(ct), A.to(ct), B.to(ct), C.to(ct)
    B = B.repeat_interleave(H // B.shape[2], dim=2)  # [B, L, H, N]
    C = C.repeat_interleave(H // C.shape[2], dim=2)
    pad = -L % chunk_size
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    # [B, c, l, ...]: c chunks of l = chunk_size steps
    x, B, C, dt = (t.unflatten(1, (-1, chunk_size)) for t in (x, B, C, dt))
    A_dt = (dt * A).permute(0, 3, 1, 2)  # [B, H, c, l]
    A_cumsum = torch.cumsum(A_dt, dim=-1)
    x = x * dt[..., None]  # discretised input dt_t x_t
    # Two-operand einsums only: with three or more, torch (through opt_einsum where installed) may pick
    # an order that materialises a [B, c, l, H, P_h, N] product.

    # 1. Within each chunk: attention-like scores C Bᵀ masked by the decay matrix, applied to x.
    decay = torch.exp(segsum(A_dt))  # [B, H, c, l, s]
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * decay
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, x)

    # 2. Each chunk's contribution to the state at its end.
    decay_states = torch.exp(A_cumsum[..., -1:] - A_cumsum)  # [B, H, c, l]
    states = torch.einsum("bclhn,bclhp->bchpn", B, x * decay_states.permute(0, 2, 3, 1)[..., None])

    # 3. Between chunks: the state recurrence over chunk boundaries, from the initial state.
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, 0])
    states = torch.cat([initial_states.to(ct)[:, None], states], dim=1)  # [B, c + 1, H, P_h, N]
    decay_chunk = torch.exp(segsum(F.pad(A_cumsum[..., -1], (1, 0))))  # [B, H, c + 1, c + 1]
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = states[:, :-1], states[:, -1]

    # 4. The state entering each chunk, read out by C and decayed to each position.
    y_off = torch.einsum("bclhn,bchpn->bclhp", C, states) * torch.exp(A_cumsum).permute(0, 2, 3, 1)[..., None]

    y = (y_diag + y_off).flatten(1, 2)[:, :L]
    if D is not None:
        y = y + x_in.to(ct) * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(dtype), final_state


def ssd_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor, D: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recurrence (decode): state [B, H, P_h, N], x [B, H, P_h], dt [B, H], A [H],
    B and C [B, G, N], D [H] -> (y [B, H, P_h] in x's dtype, new state in at least fp32)."""
    H = x.shape[1]
    ct = torch.promote_types(x.dtype, torch.float32)
    xs, dt = x.to(ct), dt.to(ct)
    B = B.to(ct).repeat_interleave(H // B.shape[1], dim=1)  # [B, H, N]
    C = C.to(ct).repeat_interleave(H // C.shape[1], dim=1)
    dA = torch.exp(dt * A.to(ct))  # [B, H]
    state = state.to(ct) * dA[..., None, None] + (dt[..., None] * xs)[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    if D is not None:
        y = y + D.to(ct)[:, None] * xs
    return y.to(x.dtype), state


def ssd_naive(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
              initial_states: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one time step at a time (the test oracle for ``ssd_chunked``; same arguments
    and results, without the chunk size)."""
    batch, L, H, P = x.shape
    ct = torch.promote_types(x.dtype, torch.float32)
    state = x.new_zeros(batch, H, P, B.shape[-1], dtype=ct) if initial_states is None else initial_states
    ys = []
    for t in range(L):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    y = torch.stack(ys, dim=1).to(ct)
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(x.dtype), state


# --------------------------------------------------------------------------------------------
# mamba-ssm (optional)
# --------------------------------------------------------------------------------------------
class MambaKernels(NamedTuple):
    mamba_chunk_scan_combined: object
    rmsnorm_fn: object


def _import_mamba_triton(submodule: str):
    """Import ``mamba_ssm.<submodule>``. The package ``__init__`` imports the CUDA extension
    ``selective_scan_cuda``, absent from CPU-only or ``MAMBA_SKIP_CUDA_BUILD`` installs, although the Triton
    modules never use it; where that import fails, a bare package module with the same ``__path__`` stands
    in for the package so the submodules still import."""
    try:
        return importlib.import_module(f"mamba_ssm.{submodule}")
    except ImportError as e:
        spec = importlib.util.find_spec("mamba_ssm") if "mamba_ssm" not in sys.modules else None
        if spec is None or spec.submodule_search_locations is None:
            raise
        logger.info("mamba_ssm package import failed (%s); loading its Triton modules without the package __init__",
                    e)
        package = types.ModuleType("mamba_ssm")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["mamba_ssm"] = package
        return importlib.import_module(f"mamba_ssm.{submodule}")


@functools.cache
def mamba_kernels() -> Optional[MambaKernels]:
    """mamba-ssm's Triton ``mamba_chunk_scan_combined`` and gated ``rmsnorm_fn``, or None (the reason is
    logged once) where mamba-ssm or Triton is missing; the plain-torch path is then used everywhere."""
    try:
        ssd = _import_mamba_triton("ops.triton.ssd_combined")
        norm = _import_mamba_triton("ops.triton.layernorm_gated")
    except Exception as e:  # any failure inside a third-party import means "not available"
        logger.info("mamba-ssm kernels unavailable, the Mamba2 mixers use the plain-torch SSD: %s: %s",
                    type(e).__name__, e)
        return None
    return MambaKernels(ssd.mamba_chunk_scan_combined, norm.rmsnorm_fn)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------
class MambaRMSNormGated(nn.Module):
    """y = RMSNorm_group(x * silu(gate)) * weight, each ``group_size`` channels normalised on their own
    (``norm_before_gate=False``), fp32 math: x, gate [..., dim] -> [..., dim]."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float() * F.silu(gate.float())
        x = x.unflatten(-1, (-1, self.group_size))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.flatten(-2).to(dtype)


class NemotronV3Mamba2Mixer(nn.Module):
    """Mamba2 mixer (HF ``NemotronHMamba2Mixer`` names): in_proj -> z | xBC | dt; causal depthwise conv +
    SiLU on xBC -> x, B, C; SSD scan; gated RMSNorm with z; out_proj."""

    def __init__(self, config: NemotronV3Config):
        super().__init__()
        c = config
        self.num_heads, self.head_dim, self.n_groups = c.mamba_num_heads, c.mamba_head_dim, c.n_groups
        self.ssm_state_size, self.chunk_size, self.conv_kernel = c.ssm_state_size, c.chunk_size, c.conv_kernel
        self.time_step_limit, self.use_mamba_kernels = c.time_step_limit, c.use_mamba_kernels
        self.intermediate_size = c.mamba_intermediate_size
        self.conv_dim = self.intermediate_size + 2 * c.n_groups * c.ssm_state_size
        self.in_proj = nn.Linear(c.hidden_size, self.intermediate_size + self.conv_dim + self.num_heads,
                                 bias=c.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, c.conv_kernel, groups=self.conv_dim,
                                padding=c.conv_kernel - 1, bias=c.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = MambaRMSNormGated(self.intermediate_size, self.intermediate_size // c.n_groups,
                                      c.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.intermediate_size, c.hidden_size, bias=c.use_bias)

    def _conv(self, xBC: torch.Tensor, cache: Optional[Mamba2State]) -> tuple[torch.Tensor, torch.Tensor]:
        """xBC [B, S, C] -> (SiLU(causal conv) [B, S, C], the last K - 1 inputs [B, C, K - 1])."""
        S = xBC.shape[1]
        xBC = xBC.transpose(1, 2)
        if cache is None:
            out = self.conv1d(xBC)[..., :S]  # padding K - 1 on both sides, cropped: causal
            window = F.pad(xBC, (self.conv_kernel - 1, 0))
        else:
            window = torch.cat([cache.conv.to(xBC.dtype), xBC], dim=-1)
            out = F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)
        return F.silu(out.transpose(1, 2)), window[..., window.shape[-1] - (self.conv_kernel - 1):]

    def forward(self, x: torch.Tensor, cache: Optional[Mamba2State] = None, use_cache: bool = False,
                mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[Mamba2State]]:
        """x [B, S, D], cache of the earlier positions or None, mask [B, S] (1 keep, 0 pad) or None ->
        (out [B, S, D], updated cache or None). Padded positions are zeroed before in_proj and after the
        conv, so left padding leaves the state at zero (exact when ``use_bias`` is off)."""
        batch, S, _ = x.shape
        H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
        z, xBC, dt = torch.split(self.in_proj(x), [self.intermediate_size, self.conv_dim, H], dim=-1)
        xBC, conv_state = self._conv(xBC, cache)
        if mask is not None:
            xBC = xBC * mask[..., None].to(xBC.dtype)
        xs, B, C = torch.split(xBC, [self.intermediate_size, G * N, G * N], dim=-1)
        xs, B, C = xs.view(batch, S, H, P), B.view(batch, S, G, N), C.view(batch, S, G, N)
        A = -torch.exp(self.A_log.float())
        initial = None if cache is None else cache.ssm
        kernels = mamba_kernels() if self.use_mamba_kernels and x.is_cuda and not torch.compiler.is_compiling() \
            else None
        if kernels is not None and (cache is None or S > 1):
            y, ssm_state = kernels.mamba_chunk_scan_combined(
                xs, dt, A, B, C, self.chunk_size, D=self.D, dt_bias=self.dt_bias, initial_states=initial,
                dt_softplus=True, dt_limit=self.time_step_limit, return_final_states=True)
        else:
            dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.time_step_limit)
            if cache is not None and S == 1:
                y, ssm_state = ssd_step(initial, xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.D)
                y = y[:, None]
            else:
                y, ssm_state = ssd_chunked(xs, dt, A, B, C, self.chunk_size, D=self.D, initial_states=initial)
        y = y.reshape(batch, S, self.intermediate_size)
        if kernels is not None:
            y = kernels.rmsnorm_fn(y, self.norm.weight, None, z=z, eps=self.norm.eps, group_size=self.norm.group_size,
                                   norm_before_gate=False)
        else:
            y = self.norm(y, z)
        new_cache = Mamba2State(conv_state, ssm_state.float()) if use_cache else None
        return self.out_proj(y.to(x.dtype)), new_cache


class NemotronV3Attention(nn.Module):
    """GQA attention without positional encoding (HF names q_proj, k_proj, v_proj, o_proj)."""

    def __init__(self, config: NemotronV3Config):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.num_heads * self.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, c.hidden_size, bias=c.attention_bias)
        self.scaling = self.head_dim ** -0.5

    def forward(self, x: torch.Tensor, mask: torch.Tensor, padding: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, use_cache: bool = False) -> tuple[torch.Tensor, Optional[KVCache]]:
        """x [B, S, D], mask [S, T] additive causal, padding [B, 1, 1, T] additive or None, cache of the
        P = T - S earlier positions or None -> (out [B, S, D], updated cache or None)."""
        batch, S, _ = x.shape
        q = self.q_proj(x).view(batch, S, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, S, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, S, self.num_kv_heads, self.head_dim)
        if cache is not None:
            k, v = torch.cat([cache.k, k], dim=1), torch.cat([cache.v, v], dim=1)
        new_cache = KVCache(k, v) if use_cache else None
        rep = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        scores = torch.einsum("bshd,bthd->bsht", q, k) * self.scaling
        scores = scores + mask.unsqueeze(-2)
        if padding is not None:
            scores = scores + padding
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.einsum("bsht,bthd->bshd", probs, v)
        return self.o_proj(out.flatten(2)), new_cache


class ReluSquaredMLP(nn.Module):
    """up -> ReLU² -> down, no gate (HF ``NemotronHMLP``): [..., dim] -> [..., dim]."""

    def __init__(self, dim: int, inter_dim: int, bias: bool = False):
        super().__init__()
        self.up_proj = nn.Linear(dim, inter_dim, bias=bias)
        self.down_proj = nn.Linear(inter_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.square(F.relu(self.up_proj(x))))


class NemotronV3MoE(MoE):
    """Nemotron's MoE: the DeepSeek-V3 sigmoid router and expert loop of ``common.MoE`` (forward
    inherited), with ReLU² experts and a shared expert of its own width
    (``moe_shared_expert_intermediate_size``): [B, S, D] -> [B, S, D]."""

    def __init__(self, config: NemotronV3Config):
        nn.Module.__init__(self)  # not MoE.__init__: it would build SwiGLU experts
        c = config
        self.gate = MoEGate(c.hidden_size, c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group,
                            c.routed_scaling_factor, c.norm_topk_prob, "sigmoid")
        self.experts = nn.ModuleList(ReluSquaredMLP(c.hidden_size, c.moe_intermediate_size, c.mlp_bias)
                                     for _ in range(c.n_routed_experts))
        self.shared_experts = ReluSquaredMLP(c.hidden_size, c.moe_shared_expert_intermediate_size, c.mlp_bias)


class NemotronV3Block(nn.Module):
    """Pre-norm residual block with one mixer: x + mixer(norm(x))."""

    def __init__(self, config: NemotronV3Config, layer_idx: int):
        super().__init__()
        c = config
        self.block_type = BLOCK_TYPES[c.hybrid_override_pattern[layer_idx]]
        self.norm = RMSNorm(c.hidden_size, c.layer_norm_epsilon)
        if self.block_type == "mamba":
            self.mixer = NemotronV3Mamba2Mixer(c)
        elif self.block_type == "attention":
            self.mixer = NemotronV3Attention(c)
        elif self.block_type == "mlp":
            self.mixer = ReluSquaredMLP(c.hidden_size, c.intermediate_size, c.mlp_bias)
        else:
            self.mixer = NemotronV3MoE(c)

    def forward(self, x, mask, padding=None, mamba_mask=None, cache=None, use_cache=False):
        """x [B, S, D], mask [S, T], padding [B, 1, 1, T] or None, mamba_mask [B, S] or None, this layer's
        cache or None -> (x [B, S, D], updated cache or None)."""
        h = self.norm(x)
        if self.block_type == "mamba":
            h, cache = self.mixer(h, cache, use_cache, mamba_mask)
        elif self.block_type == "attention":
            h, cache = self.mixer(h, mask, padding, cache, use_cache)
        else:
            h, cache = self.mixer(h), None
        return x + h, cache


class NemotronV3Model(nn.Module):
    """Embeddings, blocks and final norm (HF ``backbone``): token ids [B, S] -> hidden states [B, S, D]."""

    def __init__(self, config: NemotronV3Config):
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(NemotronV3Block(config, i) for i in range(config.num_hidden_layers))
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, input_ids, attention_mask=None, past_key_values: Optional[NemotronV3Cache] = None,
                use_cache=False):
        """input_ids [B, S], attention_mask [B, T] (1 keep, 0 pad; T = cached + S) -> (hidden [B, S, D],
        cache or None)."""
        batch, S = input_ids.shape
        device = input_ids.device
        P = 0 if past_key_values is None else past_key_values.length
        T = P + S
        # Causal mask the usual eager way; the offset lets the S new queries see all P cached keys.
        mask = torch.full((S, T), float("-inf"), device=device).triu(P + 1)
        padding = mamba_mask = None
        if attention_mask is not None:
            if attention_mask.shape != (batch, T):
                raise ValueError(f"attention_mask must be [batch, cached + new] = {(batch, T)}, "
                                 f"got {tuple(attention_mask.shape)}")
            # finfo.min, not -inf: a fully padded row (a left-pad query) stays finite after softmax.
            padding = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
            mamba_mask = attention_mask[:, P:]
        h = self.embeddings(input_ids)
        caches = []
        for i, layer in enumerate(self.layers):
            h, cache = layer(h, mask, padding, mamba_mask,
                             None if past_key_values is None else past_key_values.layers[i], use_cache)
            caches.append(cache)
        return self.norm_f(h), NemotronV3Cache(tuple(caches), T) if use_cache else None


class NemotronV3ForCausalLM(PretrainedMixin, nn.Module):
    """Nemotron V3 language model (HF ``NemotronHForCausalLM`` names: ``backbone``, ``lm_head``)."""

    config_class = NemotronV3Config

    def __init__(self, config: NemotronV3Config):
        super().__init__()
        self.config = config
        self.backbone = NemotronV3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        c = self.config
        if isinstance(module, (nn.Linear, nn.Embedding, MoEGate)):
            nn.init.normal_(module.weight, std=c.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, NemotronV3Mamba2Mixer):
            # S4D-real A = -(1..H); dt_bias = softplus⁻¹ of a log-uniform dt in [time_step_min, time_step_max].
            with torch.no_grad():
                module.A_log.copy_(torch.log(torch.arange(1, module.num_heads + 1, dtype=torch.float32)))
                log_dt = torch.rand(module.num_heads) * (math.log(c.time_step_max) - math.log(c.time_step_min))
                dt = torch.exp(log_dt + math.log(c.time_step_min)).clamp(min=c.time_step_floor)
                module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
                module.D.fill_(1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, past_key_values: Optional[NemotronV3Cache] = None,
                use_cache: bool = False) -> NemotronV3CausalLMOutput:
        """input_ids [B, S]; attention_mask [B, T] (T = cached + S; 1 keep, 0 pad); labels [B, S] (-100
        ignored, shifted inside); ``past_key_values`` / ``use_cache``: decode with a ``NemotronV3Cache``."""
        hidden, cache = self.backbone(input_ids, attention_mask, past_key_values, use_cache)
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return NemotronV3CausalLMOutput(loss=loss, logits=logits, past_key_values=cache)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, attention_mask: Optional[torch.Tensor] = None,
                 eos_token_id: Optional[int] = None) -> torch.Tensor:
        """Greedy decoding with the conv / SSM / KV caches: [B, S] -> [B, S + n] (n <= max_new_tokens; rows
        that produced ``eos_token_id`` are padded with it until every row has). Left padding only."""
        return greedy_generate(self, input_ids, max_new_tokens, attention_mask, eos_token_id)
