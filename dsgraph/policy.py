"""Backend policy: which kernel implementation serves each fused op, decided at compile time.

A policy is an ordered backend preference per op. For every rewritten site the first backend whose
kernel says it supports the site wins; the others are recorded in the report with their reasons.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

# "sdpa" first among the portable ones: where it can express a site, PyTorch's flash kernels are
# faster than ours (see benchmarks/RESULTS.md); likewise mamba-ssm's tuned Triton kernels (Mamba2
# scan, gated norm) before ours. "flex" (PyTorch's FlexAttention) after our Triton kernel, which
# beats it on the bands and sinks it serves.
BACKENDS = ("tilelang", "sdpa", "mamba_ssm", "triton", "flex", "torch")
# Ops whose default order differs from BACKENDS (a default, so neither forced nor exempt from tuning).
# ssd_step: mamba-ssm's selective_state_update updates its state in place, so our functional op copies
# the state first; on an H100 at Nemotron decode sizes (b=32, H=128, P=64, N=128, fp32 state 128 MiB)
# that copy took 86 us next to the kernel's 98 us. Our Triton step writes the new state out of place
# in one pass (256 MiB moved instead of 512 MiB).
DEFAULT_OP_ORDERS: Mapping[str, tuple[str, ...]] = {
    "ssd_step": ("tilelang", "sdpa", "triton", "mamba_ssm", "flex", "torch"),
    # SDPA (FlashAttention-2 / cuDNN) beat our kernels on every site it can express (H100, causal 8k
    # bf16: 0.90 ms fwd vs TileLang 1.11 ms; RESULTS.md); TileLang leads where SDPA cannot (sinks, bands).
    "attention": ("sdpa", "tilelang", "triton", "mamba_ssm", "flex", "torch"),
    # Triton's pool kernels beat TileLang's in every measured case (H100, S = 16k fp32: ratio 4 fwd/bwd
    # 58.5 / 118 us vs 60.8 / 172 us; ratio 128 34.7 / 114 us vs 81.7 / 316 us).
    "window_pool": ("triton", "tilelang", "sdpa", "mamba_ssm", "flex", "torch"),
}
PRESETS = ("auto", "autotune", "reference", "triton", "tilelang")
# How a policy uses measured choices (dsgraph/autotune.py): "off", "cached" (use a cached choice when
# there is one, never measure), "measure" (time every backend that can serve a site, cache the winner).
TUNING = ("off", "cached", "measure")
RESIDUALS = ("inductor", "eager")
ENV_VAR = "DSGRAPH_POLICY"


@dataclasses.dataclass(frozen=True)
class Policy:
    """Per-op ordered backend preference.

    - ``order``: default preference for every op, e.g. ``("tilelang", "triton", "sdpa", "torch")``.
      The default, ``BACKENDS``, stands for each op's default order: ``DEFAULT_OP_ORDERS`` where the
      op has an entry (ssd_step: triton before mamba_ssm; attention: sdpa first), else ``BACKENDS``; any other order applies
      as given to every op.
    - ``ops``: per-op overrides the user named, e.g. ``{"attention": ("triton", "torch")}`` (forced).
    - ``forced``: the user named these backends (preset "triton"/"tilelang"/"reference" or an explicit
      order): when none of them can serve a site, ``strict`` raises, otherwise the remaining backends
      are tried with a logged warning.
    - ``residual``: what compiles the graph left after rewriting: ``"inductor"`` or ``"eager"`` (debugging).
    - ``disabled_passes``: pass names not to run.
    - ``tuning``: one of ``TUNING``; ops the policy names explicitly are never tuned.
    - ``cudagraphs``: replay each compiled graph as a CUDA graph (Inductor's CUDA graph trees, as
      ``torch.compile(mode="reduce-overhead")``): for launch-bound graphs such as a decode step. The
      usual caveats hold: outputs live in a pool the next replay overwrites (clone what you keep),
      inputs are copied into static buffers. Needs ``residual="inductor"``.
    """

    order: tuple[str, ...] = BACKENDS
    ops: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    forced: bool = False
    strict: bool = False
    residual: str = "inductor"
    disabled_passes: frozenset[str] = frozenset()
    name: str = "auto"
    tuning: str = "cached"
    cudagraphs: bool = False

    def __post_init__(self):
        for backends in (self.order, *self.ops.values()):
            _check_backends(backends)
        if self.residual not in RESIDUALS:
            raise ValueError(f"Policy.residual must be one of {RESIDUALS}, got {self.residual!r}")
        if self.tuning not in TUNING:
            raise ValueError(f"Policy.tuning must be one of {TUNING}, got {self.tuning!r}")
        if not isinstance(self.cudagraphs, bool):
            raise TypeError(f"Policy.cudagraphs must be True or False, got {self.cudagraphs!r}")
        if self.cudagraphs and self.residual != "inductor":
            raise ValueError("Policy.cudagraphs needs residual='inductor' (Inductor records the CUDA graphs), "
                             f"got residual={self.residual!r}")
        object.__setattr__(self, "disabled_passes", frozenset(self.disabled_passes))

    @classmethod
    def preset(cls, name: str, **overrides) -> "Policy":
        """``auto``: fastest available first (or a cached measured choice); ``autotune``: measure on
        the GPU at compile time; ``reference``: torch only; ``triton``/``tilelang``: forced."""
        if name == "auto":
            return cls(name=name, **overrides)
        if name == "autotune":
            return cls(name=name, tuning="measure", **overrides)
        if name == "reference":
            return cls(order=("torch",), forced=True, name=name, tuning="off", **overrides)
        if name in ("triton", "tilelang"):
            return cls(order=(name,), forced=True, name=name, tuning="off", **overrides)
        raise ValueError(f"unknown policy preset {name!r}; accepted presets: {', '.join(PRESETS)}")

    @classmethod
    def parse(cls, spec: str) -> "Policy":
        """Parse ``DSGRAPH_POLICY`` syntax: ``PRESET[;op=b1,b2][;strict][;cudagraphs][;residual=eager]``.

        Examples: ``triton``, ``auto;attention=triton,torch``, ``reference;residual=eager``,
        ``triton;strict``, ``auto;cudagraphs``.
        """
        parts = [p.strip() for p in spec.split(";") if p.strip()]
        if not parts:
            raise ValueError(f"{ENV_VAR} is empty; accepted: PRESET[;op=b1,b2][;strict][;cudagraphs][;residual=eager]")
        preset, opts = parts[0], parts[1:]
        fields: dict = {"ops": {}}
        for opt in opts:
            if opt in ("strict", "cudagraphs"):
                fields[opt] = True
            elif "=" in opt:
                key, value = (s.strip() for s in opt.split("=", 1))
                if key == "residual":
                    fields["residual"] = value
                elif key == "disable":
                    fields["disabled_passes"] = frozenset(v.strip() for v in value.split(","))
                else:
                    fields["ops"][key] = tuple(v.strip() for v in value.split(","))
            else:
                raise ValueError(f"cannot parse {opt!r} in policy {spec!r}; accepted: "
                                 "PRESET[;op=b1,b2][;strict][;cudagraphs][;residual=eager][;disable=pass1,pass2]")
        return cls.preset(preset, **fields)

    def backends_for(self, op: str) -> tuple[str, ...]:
        if op in self.ops:
            return tuple(self.ops[op])
        return default_order(op) if tuple(self.order) == BACKENDS else tuple(self.order)

    def is_forced(self, op: str) -> bool:
        return self.forced or op in self.ops


def default_order(op: str) -> tuple[str, ...]:
    """The preference of ``op`` under the default order (also the order in which a forced, non-strict
    policy tries the remaining backends)."""
    return DEFAULT_OP_ORDERS.get(op, BACKENDS)


def _check_backends(backends) -> None:
    if not backends:
        raise ValueError(f"a backend order must name at least one of {BACKENDS}")
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r}; accepted backends: {', '.join(BACKENDS)}")


def resolve_policy(policy: "Policy | str | None") -> Policy:
    """The effective policy: ``DSGRAPH_POLICY`` overrides the argument (so a deployed model can be
    switched to the reference path without code changes)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Policy.parse(env)
    if policy is None:
        return Policy.preset("auto")
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str):
        return Policy.parse(policy)
    raise TypeError(f"policy must be a dsgraph.Policy or a preset name {PRESETS}, got {type(policy).__name__}")
