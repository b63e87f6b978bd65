"""dsgraph: rewrite the attention, mask and other subgraphs of plain-eager PyTorch models into fused
kernels chosen by a backend policy at compile time, with a report of what was rewritten and why."""
import torch as _torch

from .backend import dsgraph_backend, explain, optimize
from .pipeline import Pass, PipelineError
from .policy import Policy
from .registry import BackendUnavailableError
from .report import Report, Rewrite

__all__ = ["optimize", "explain", "Policy", "Report", "Rewrite", "Pass", "PipelineError",
           "BackendUnavailableError", "dsgraph_backend", "testing"]
__version__ = "0.1.0"

if "dsgraph" not in _torch._dynamo.list_backends(exclude_tags=()):
    _torch._dynamo.register_backend(dsgraph_backend, name="dsgraph")


def __getattr__(name):
    if name == "testing":  # hypothesis is a test dependency: import it only when asked for
        import importlib
        return importlib.import_module("dsgraph.testing")
    raise AttributeError(f"module 'dsgraph' has no attribute {name!r}")
