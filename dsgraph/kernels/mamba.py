"""The one place dsgraph imports mamba-ssm (optional: ``pip install -e '.[mamba]'``).

mamba-ssm's package ``__init__`` imports its CUDA extension (``selective_scan_cuda``), absent from CPU-only
and ``MAMBA_SKIP_CUDA_BUILD`` installs, although the Triton modules dsgraph uses never need it. So: the
normal import where it works, else a bare package module with the installed package's ``__path__`` stands
in for ``mamba_ssm`` and the Triton submodules load without the ``__init__``. Which path was taken is
logged once. Kernels ask ``mamba_unavailable(...)`` for a reason string their ``unsupported`` can return.
(``models/nemotron_v3.py`` keeps its own copy of this loader: models never import dsgraph.)
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import sys
import types
from typing import Optional

log = logging.getLogger("dsgraph")


class MambaUnavailableError(ImportError):
    """mamba-ssm (or the submodule asked for) cannot be imported; the message says why."""


@functools.cache
def _package() -> str:
    """Import ``mamba_ssm`` one way or the other; returns the way taken, raises with the reason."""
    try:
        importlib.import_module("mamba_ssm")
        log.info("dsgraph: mamba-ssm imported as a package")
        return "package"
    except Exception as e:  # any failure inside a third-party __init__ means "use the fallback"
        error = f"{type(e).__name__}: {e}"
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or spec.submodule_search_locations is None:
        raise MambaUnavailableError(f"mamba-ssm is not installed ({error})")
    package = types.ModuleType("mamba_ssm")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["mamba_ssm"] = package
    log.info("dsgraph: mamba-ssm package import failed (%s); loading its Triton modules without the package "
             "__init__", error)
    return "triton-only"


@functools.cache
def _load(submodule: str):
    """(module, None) or (None, reason), cached so a failing import is tried (and logged) once."""
    try:
        _package()
        return importlib.import_module(f"mamba_ssm.{submodule}"), None
    except MambaUnavailableError as e:
        return None, str(e)
    except Exception as e:
        reason = f"mamba_ssm.{submodule} failed to import ({type(e).__name__}: {e})"
        log.info("dsgraph: %s", reason)
        return None, reason


def mamba_module(submodule: str) -> types.ModuleType:
    """``mamba_ssm.<submodule>``, e.g. ``"ops.triton.ssd_combined"``; raises ``MambaUnavailableError``."""
    module, reason = _load(submodule)
    if module is None:
        raise MambaUnavailableError(reason)
    return module


def mamba_unavailable(*submodules: str) -> Optional[str]:
    """None when every submodule imports, else the first reason (for a kernel's ``unsupported``)."""
    for submodule in submodules:
        reason = _load(submodule)[1]
        if reason is not None:
            return reason
    return None
