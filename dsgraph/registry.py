"""Kernel registry: the implementations of each ``dsgraph::`` op, one per backend.

Each implementation says whether it can serve a site (device, capability, dtype, shapes, importable
backend) and, when not, why. ``choose`` walks the policy's preference (or takes a measured choice:
dsgraph/autotune.py).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional

from .policy import Policy, default_order

log = logging.getLogger("dsgraph")


class BackendUnavailableError(RuntimeError):
    """A backend forced by a strict policy cannot serve a site."""


@dataclasses.dataclass(frozen=True)
class KernelImpl:
    op: str
    backend: str
    forward: Callable[..., Any]
    backward: Optional[Callable[..., Any]]
    # Called with the op's arguments (fake tensors at compile time); returns None or the reason.
    unsupported: Callable[..., Optional[str]]
    # What the rewritten graph runs at a site for this backend, called with real tensors and the same
    # keywords as ``unsupported``; returns the op's differentiable output(s). Autotune times it
    # compiled (``autotune.timing_step``), so it must trace with Dynamo in one graph.
    run: Optional[Callable[..., Any]] = None


_KERNELS: dict[str, dict[str, KernelImpl]] = {}


def register_kernel(impl: KernelImpl) -> KernelImpl:
    _KERNELS.setdefault(impl.op, {})[impl.backend] = impl
    return impl


def kernel(op: str, backend: str) -> KernelImpl:
    try:
        return _KERNELS[op][backend]
    except KeyError:
        known = ", ".join(sorted(_KERNELS.get(op, {}))) or "none"
        raise KeyError(f"no {backend!r} kernel registered for dsgraph::{op} (registered: {known})") from None


def registered_backends(op: str) -> tuple[str, ...]:
    return tuple(_KERNELS.get(op, {}))


@dataclasses.dataclass
class Choice:
    """A site's backend, why each backend before it (or forced and unusable) was not used, and, when
    measured or read from the autotune cache, each candidate's time (ms) or why it has none."""

    backend: str
    rejected: dict[str, str]
    timings: dict[str, "float | str"] = dataclasses.field(default_factory=dict)
    tuning_note: str = ""


def choose(op: str, policy: Policy, site: str, *, requires_grad: bool = False, **args) -> Choice:
    """Pick the backend for one site: the first in the policy's preference that can serve it, and
    the reason of each backend tried before it (or forced and unusable). The policy's tuning
    (``dsgraph.autotune``): ``"measure"`` times every backend that can serve the site and takes the
    fastest; ``"cached"`` takes a cached measured choice when one exists. ``requires_grad``: the
    site needs gradients (timings are then forward + backward)."""
    preferred = policy.backends_for(op)
    candidates = list(preferred)
    if policy.is_forced(op) and not policy.strict:
        candidates += [b for b in default_order(op) if b not in candidates]
    tuned = policy.tuning != "off" and not policy.is_forced(op)
    reasons: dict[str, str] = {}
    usable: list[str] = []
    for backend in candidates:
        impl = _KERNELS.get(op, {}).get(backend)
        reason = "no kernel registered" if impl is None else impl.unsupported(**args)
        if reason is not None:
            reasons[backend] = reason
            continue
        usable.append(backend)
        if not tuned:
            break
    if not usable:
        detail = "; ".join(f"{b}: {r}" for b, r in reasons.items())
        raise BackendUnavailableError(
            f"no backend can serve dsgraph::{op} at {site} under policy {policy.name!r} "
            f"(tried {', '.join(candidates)}): {detail}")
    backend, timings, note = usable[0], {}, ""
    if tuned:
        from .autotune import tune
        backend, timings, note = tune(op, usable, args, requires_grad=requires_grad,
                                      measure=policy.tuning == "measure", site=site)
    rejected = {b: reasons.get(b) or _lost(timings.get(b)) for b in candidates[:candidates.index(backend)]}
    if backend not in preferred:
        log.warning("dsgraph: %s at %s: forced backend(s) %s cannot serve it (%s); using %s",
                    op, site, "/".join(preferred),
                    "; ".join(f"{b}: {rejected[b]}" for b in preferred), backend)
    return Choice(backend, rejected, timings, note)


def _lost(time) -> str:
    return f"slower ({time:.3g} ms)" if isinstance(time, float) else f"not timed: {time}"
