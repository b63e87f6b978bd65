"""Argument checks the kernel families share."""
from __future__ import annotations

import importlib
from typing import Optional

import torch


def check_additive_bias(bias: Optional[torch.Tensor], full: tuple, layout: str) -> None:
    """Raise unless ``bias`` is None or a float tensor broadcastable to ``full`` (named ``layout``)."""
    if bias is None:
        return
    if not bias.is_floating_point():
        raise ValueError(f"bias must be a float tensor (additive); got {bias.dtype}")
    try:
        ok = torch.broadcast_shapes(bias.shape, full) == full
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"bias {tuple(bias.shape)} must broadcast to {layout} = {full}")


def triton_device_reason(tensors, interpret: bool, kernel: str) -> Optional[str]:
    """None when a Triton kernel can run on the tensors' device, else the reason."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        return f"tensors on several devices {sorted(map(str, devices))}"
    device = next(iter(devices)).type
    if device == "cpu" and not interpret:
        return "device cpu needs TRITON_INTERPRET=1"
    if device not in ("cuda", "cpu"):
        return f"device {device} not supported by the {kernel}"
    return None


def tilelang_device_reason(tensors, kernel: str) -> Optional[str]:
    """None when the Hopper (sm_90a) TileLang ``kernel`` can run on the tensors, else the reason: a
    missing or broken tilelang install is a reason, never a failed compile."""
    try:
        importlib.import_module("tilelang")
    except Exception as exc:
        return f"tilelang not importable ({exc})"
    tensors = [t for t in tensors if t is not None]
    if any(t.device.type != "cuda" for t in tensors):
        return f"the {kernel}: CUDA tensors only"
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        return f"tensors on several devices {sorted(map(str, devices))}"
    major, minor = torch.cuda.get_device_capability(tensors[0].device)
    if major != 9:
        return f"compute capability {major}.{minor} (the {kernel}: sm_90a only)"
    return None


def with_autograd():
    """Custom-op kernels run below autograd (its dispatch keys excluded from the thread's key set): a
    backward that recomputes its forward under autograd lifts that exclusion while it runs (with
    ``torch.enable_grad()``). Removing one per-backend autograd key clears the shared autograd
    functionality bit, so CUDA is covered too."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradCPU, torch._C.DispatchKey.AutogradOther,
                torch._C.DispatchKey.AutogradNestedTensor):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)
