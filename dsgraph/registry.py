"""Kernel registry: the implementations of each ``dsgraph::`` op, one per backend.

Each implementation says whether it can serve a site (device, capability, dtype, shapes, importable
backend) and, when not, why. ``choose`` walks the policy's preference and returns the first that can.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional

from .policy import BACKENDS, Policy

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


def choose(op: str, policy: Policy, site: str, **args) -> tuple[str, dict[str, str]]:
    """Pick the backend for one site. Returns ``(backend, rejected)`` where ``rejected`` maps each
    backend tried before the winner (or forced and unusable) to its reason."""
    rejected: dict[str, str] = {}
    preferred = policy.backends_for(op)
    candidates = list(preferred)
    if policy.is_forced(op) and not policy.strict:
        candidates += [b for b in BACKENDS if b not in candidates]
    for backend in candidates:
        impl = _KERNELS.get(op, {}).get(backend)
        reason = "no kernel registered" if impl is None else impl.unsupported(**args)
        if reason is None:
            if backend not in preferred:
                log.warning("dsgraph: %s at %s: forced backend(s) %s cannot serve it (%s); using %s",
                            op, site, "/".join(preferred),
                            "; ".join(f"{b}: {rejected[b]}" for b in preferred), backend)
            return backend, rejected
        rejected[backend] = reason
    detail = "; ".join(f"{b}: {r}" for b, r in rejected.items())
    raise BackendUnavailableError(
        f"no backend can serve dsgraph::{op} at {site} under policy {policy.name!r} "
        f"(tried {', '.join(candidates)}): {detail}")
