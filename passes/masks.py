"""Mask building -> symbolic masks.

Recognises, however the eager code spells them:
- banded masks (causal ``triu``/``tril`` of ``full``/``ones``, ``arange`` comparisons, sliding
  windows, their ``where``/``masked_fill``/``&``/``|`` combinations), additive (0 / -inf or a large
  negative) or boolean (allowed or blocked): any mask computed from constants alone is evaluated
  once at compile time for the site's shapes and replaced by ``dsgraph::band_mask`` only if it
  equals a band ``lower <= j - i <= upper`` exactly;
- top-k scatter masks ``full(-inf).scatter_(-1, idx, 0)`` -> ``dsgraph::topk_mask``.

Padding masks from a [B, T] ``attention_mask`` need no op of their own: the attention pass keeps
them in their compact [B, 1, 1, T] shape.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from dsgraph.fxutil import call, evaluate, is_constant, val
from dsgraph.ops.masks import band_allowed
from dsgraph.pipeline import Pass, PassContext

aten = torch.ops.aten

# Additive mask values at or below this are "masked": exp(score - rowmax) underflows to exactly 0
# in fp32 for them whenever |scores| < 1e4, so they act as -inf (finfo(fp16).min = -65504 is one).
MASKED_BELOW = -1e4
# Constant masks up to 16k x 16k are evaluated at compile time; larger ones where they live on a GPU with
# room for the value, a temporary of its size while it is computed and classify()'s row chunks (a 64k x 64k
# fp32 mask is 16 GiB), else left alone.
MAX_EVAL_ELEMENTS = 1 << 28
EVAL_MEMORY_FACTOR = 3


def masked_value(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x <= MASKED_BELOW


CHUNK_ELEMENTS = 1 << 24


def row_chunks(rows: int, cols: int):
    """Row slices of about CHUNK_ELEMENTS: the checks below never hold more than a few such temporaries
    next to the mask (a 64k x 64k mask is 2^32 elements)."""
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    return (slice(start, min(start + step, rows)) for start in range(0, rows, step))


def band_of(allowed: torch.Tensor) -> Optional[tuple[Optional[int], Optional[int]]]:
    """(lower, upper) if ``allowed`` [S, T] is exactly the band ``lower <= j - i <= upper`` and
    masks something (an all-allowed constant is no mask)."""
    rows, cols = allowed.shape
    lo, hi, count = None, None, 0
    for part in row_chunks(rows, cols):
        diff = torch.arange(cols, device=allowed.device)[None, :] - torch.arange(
            part.start, part.stop, device=allowed.device)[:, None]
        chunk = allowed[part]
        count += int(chunk.sum())
        if chunk.any():
            lo = min(v for v in (lo, int(diff.masked_fill(~chunk, cols).min())) if v is not None)
            hi = max(v for v in (hi, int(diff.masked_fill(~chunk, -rows).max())) if v is not None)
    if count in (0, rows * cols):
        return None
    lower = None if lo <= -(rows - 1) else lo
    upper = None if hi >= cols - 1 else hi
    for part in row_chunks(rows, cols):
        band = band_allowed(part.stop - part.start, cols, None if lower is None else lower + part.start,
                            None if upper is None else upper + part.start, allowed.device)
        if not torch.equal(allowed[part], band):
            return None
    return lower, upper


def classify(value: torch.Tensor, prefer_blocked: bool = False):
    """(rows, cols, lower, upper, masked_value, invert) for a band-mask constant, else None. The
    band is the last two dims repeated over the leading ones, or the only two non-1 dims."""
    planes = [tuple(value.shape[-2:])]
    squeezed = [s for s in value.shape if s != 1]
    if len(squeezed) == 2 and tuple(squeezed) != planes[0]:
        planes.append(tuple(squeezed))
    for rows, cols in planes:
        flat = value.reshape(-1, rows, cols)
        if not all(torch.equal(plane, flat[0]) for plane in flat[1:]):
            continue  # differs across batch/head: not one band
        spec = _classify_plane(flat[0], prefer_blocked)
        if spec is not None:
            return (rows, cols, *spec)
    return None


def _classify_plane(plane: torch.Tensor, prefer_blocked: bool):
    if plane.dtype == torch.bool:
        # A few masks read as either (e.g. one row); take the reading their consumer uses.
        for invert in ((True, False) if prefer_blocked else (False, True)):
            band = band_of(~plane if invert else plane)
            if band is not None:
                return (*band, 0.0, invert)
        return None
    if not plane.is_floating_point():
        return None
    blocked = plane != 0
    fills = set()  # the distinct nonzero values, chunk by chunk (one is a mask's fill)
    for part in row_chunks(*plane.shape):
        fills.update(plane[part][blocked[part]].unique().tolist())
        if len(fills) > 1:
            return None
    if fills and not masked_value(next(iter(fills))):
        return None
    band = band_of(~blocked)
    fill = fills.pop() if fills else float("-inf")
    return None if band is None else (*band, fill, False)


def _free_cuda_bytes(device: torch.device) -> int:
    """Free device memory plus what PyTorch's caching allocator holds unused (a program that ran larger
    steps before compiling keeps it reserved; the evaluation's allocations reuse it)."""
    return (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
            - torch.cuda.memory_allocated(device))


def too_large_to_evaluate(v: torch.Tensor) -> Optional[str]:
    if v.numel() <= MAX_EVAL_ELEMENTS:
        return None
    need = EVAL_MEMORY_FACTOR * v.numel() * v.element_size()
    if v.device.type == "cuda" and need <= _free_cuda_bytes(v.device):
        return None
    return (f"constant mask {list(v.shape)} not evaluated at compile time: above {MAX_EVAL_ELEMENTS} elements "
            f"it is evaluated only on a GPU with {need / 2 ** 30:.1f} GiB free (device {v.device})")


class MaskPass(Pass):
    name = "masks"
    provides = ("symbolic_masks",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        constant: dict = {}
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            if node.target in (aten.scatter.value, aten.scatter_.value):
                self._topk(gm, node, ctx, constant)
            elif self._is_band_candidate(node, constant):
                reason = too_large_to_evaluate(val(node))
                if reason is None:
                    self._band(gm, node, ctx)
                else:
                    ctx.skip(node, reason)

    @staticmethod
    def _is_band_candidate(node: fx.Node, constant: dict) -> bool:
        v = val(node)
        if not isinstance(v, torch.Tensor) or v.dim() < 2 or min(v.shape[-2:]) < 1:
            return False
        if not (v.dtype == torch.bool or v.is_floating_point()):
            return False
        if node.target is torch.ops.dsgraph.band_mask.default or not is_constant(node, constant):
            return False
        # Only the largest constant subgraph: some user must depend on non-constant data.
        return any(not is_constant(u, constant) for u in node.users)

    def _band(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> None:
        value = evaluate(gm, node)
        blocked_use = any(u.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor) and u.args[1] is node
                          for u in node.users)
        spec = classify(value, prefer_blocked=blocked_use)
        if spec is None:
            return
        rows, cols, lower, upper, fill, invert = spec
        with gm.graph.inserting_before(node):
            new = call(gm.graph, torch.ops.dsgraph.band_mask.default, rows, cols, lower, upper,
                       value.dtype, fill, invert, value.device, like=node)
            if value.numel() == rows * cols:  # only size-1 dims around the band
                if list(value.shape) != [rows, cols]:
                    new = call(gm.graph, aten.view.default, new, list(value.shape), like=node)
            else:  # the same band repeated over leading dims
                new = call(gm.graph, aten.view.default, new, [1] * (value.dim() - 2) + [rows, cols], like=node)
                new = call(gm.graph, aten.expand.default, new, list(value.shape), like=node)
        kind = "bool, blocked" if invert else "bool" if value.dtype == torch.bool else f"additive {fill:g}"
        ctx.commit(gm, op="band_mask", old=node, new=new, inputs=[],
                   detail=f"band {lower} <= j - i <= {upper} over {rows}x{cols} ({kind})")

    def _topk(self, gm: fx.GraphModule, node: fx.Node, ctx: PassContext, constant: dict) -> None:
        base, dim, index, value = node.args[:4]
        base_val = val(base)
        if not (isinstance(base, fx.Node) and base.target is aten.full.default and is_constant(base, constant)):
            return
        fill = base.args[1]
        if value != 0 or not masked_value(fill) or dim not in (-1, base_val.dim() - 1):
            return
        if list(val(index).shape[:-1]) != list(base_val.shape[:-1]):
            return  # scatter with a smaller index block: not one index row per query
        with gm.graph.inserting_before(node):
            new = call(gm.graph, torch.ops.dsgraph.topk_mask.default, index, base_val.shape[-1],
                       base_val.dtype, float(fill), like=node)
        ctx.commit(gm, op="topk_mask", old=node, new=new, inputs=[index],
                   detail=f"top-{val(index).shape[-1]} of {base_val.shape[-1]} keys")
