"""Causal depthwise conv1d (+ SiLU) -> ``dsgraph::causal_conv1d``.

Recognises a depthwise ``conv1d`` over the sequence (``nn.Conv1d(C, C, K, groups=C)`` or
``F.conv1d(..., groups=C)``, stride and dilation 1, with or without bias) whose outputs are a causal
convolution of its input, however the causality is written:
- ``padding=K - 1`` and a crop of the first L outputs (``conv(x)[..., :L]``, Mamba2's form);
- ``F.pad(x, (K - 1, 0))`` then an unpadded conv;
- the conv state concatenated in front (``conv(cat([state, x], -1))``: the causal conv of the window
  from position K - 1 on);
in general any left/right padding and crop whose outputs all read inputs at or before their own
position. The input may be the transpose of a [B, L, C] tensor (read in place, strided) or any
[B, C, L] tensor; transposes, crops and ``F.silu`` or ``t * sigmoid(t)`` after the conv are folded
in (the activation becomes the op's ``activation="silu"``).

The op computes in fp32 and rounds once (eager rounds the conv output before the SiLU).
Constraints (else the site is left alone): a 3-D input, a [C, 1, K] weight with groups = C,
stride 1, dilation 1, zero padding, outputs that are causal-conv positions.

The decode form -> ``dsgraph::causal_conv1d_update``: the conv input is ``cat([state, x], -1)`` with
state [B, C, K - 1] (through casts: the op rounds it to the window's dtype, as the cat does) and the
window's last K - 1 columns (``window[..., W - (K - 1):]``, the new conv state) are also used; every kept
output reads only the window (no zero padding). The conv, its epilogue and those slices become the op's
two outputs. Forward only: where gradients are needed, or the new state is used before the conv, the
conv alone becomes ``causal_conv1d`` and the skip says why.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from dsgraph.fxutil import CASTS, call, val
from dsgraph.ops.conv1d import DTYPES
from dsgraph.pipeline import Pass, PassContext

aten = torch.ops.aten
dsgraph_ops = torch.ops.dsgraph

CONVS = (aten.conv1d.default, aten.convolution.default)
# A full crop traces to alias; .contiguous() to clone.
SAME_VALUES = (aten.alias.default, aten.clone.default, aten.contiguous.default)
_CASTS = tuple(CASTS - {aten.to.device, aten.clone.default})


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _arg(node: fx.Node, index: int, name: str, default):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _one(value, default: int) -> Optional[int]:
    """An int from a 1-element list (conv hyper-parameters), else None."""
    if value is None:
        return default
    if isinstance(value, int):
        return value
    value = list(value)
    return value[0] if len(value) == 1 else None


def _slice_start(node: fx.Node, size: int) -> int:
    """A slice's first index in a dim of ``size``, as Python normalises it."""
    lo = _arg(node, 2, "start", None) or 0
    return min(max(lo + size if lo < 0 else lo, 0), size)


def _state_source(node: fx.Node, window: torch.dtype) -> fx.Node:
    """Strip the casts on the conv state whose removal keeps ``round(value, window dtype)``: a cast to
    the window's dtype (the op rounds to it) or one that holds every value of its source; never a
    device move or a source dtype the op does not take."""
    while _is(node, *_CASTS) and isinstance(node.args[0], fx.Node):
        src, dst = val(node.args[0]), val(node)
        if src.dtype not in DTYPES or src.device != dst.device or \
                (dst.dtype != window and torch.promote_types(src.dtype, dst.dtype) != dst.dtype):
            break
        node = node.args[0]
    return node


def _swaps_last_two(node) -> bool:
    """transpose(1, 2) / permute(0, 2, 1) of a 3-D value."""
    if _is(node, aten.transpose.int) and val(node).dim() == 3:
        return sorted(d % 3 for d in node.args[1:3]) == [1, 2]
    if _is(node, aten.permute.default) and val(node).dim() == 3:
        return [d % 3 for d in node.args[1]] == [0, 2, 1]
    return False


def _silu_of(node: fx.Node) -> Optional[fx.Node]:
    """The node computing silu(node) (``F.silu`` or ``node * sigmoid(node)``) if that is its use."""
    users = list(node.users)
    if len(users) == 1 and _is(users[0], aten.silu.default):
        return users[0]
    if len(users) == 2:
        sig = next((u for u in users if _is(u, aten.sigmoid.default)), None)
        mul = next((u for u in users if _is(u, aten.mul.Tensor)), None)
        if sig is not None and mul is not None and set(mul.args[:2]) == {node, sig} and len(sig.users) == 1:
            return mul
    return None


class CausalConv1dPass(Pass):
    name = "conv1d"
    provides = ("causal_conv1d",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        for node in list(gm.graph.nodes):
            if _is(node, *CONVS):
                self._site(gm, ctx, node)

    def _site(self, gm: fx.GraphModule, ctx: PassContext, conv: fx.Node) -> None:
        inp, weight, bias = conv.args[0], conv.args[1], _arg(conv, 2, "bias", None)
        if conv.target is aten.convolution.default:
            stride, padding, dilation = conv.args[3:6]
            transposed, groups = conv.args[6], conv.args[8]
        else:
            stride, padding, dilation = (_arg(conv, i, n, None) for i, n in ((3, "stride"), (4, "padding"),
                                                                            (5, "dilation")))
            transposed, groups = False, _arg(conv, 6, "groups", 1)
        w = val(weight)
        if val(inp).dim() != 3 or w.dim() != 3 or transposed:
            return
        channels, k = val(inp).shape[1], w.shape[2]
        if w.shape[:2] != (channels, 1) or groups != channels or _one(stride, 1) != 1 or _one(dilation, 1) != 1:
            return  # not a depthwise conv over the sequence
        pad = _one(padding, 0)
        if pad is None:
            return
        left, src = pad, inp
        if _is(src, aten.pad.default, aten.constant_pad_nd.default):
            sizes = list(src.args[1])
            mode = _arg(src, 2, "mode", "constant") if src.target is aten.pad.default else "constant"
            value = _arg(src, 3 if src.target is aten.pad.default else 2, "value", 0)
            if len(sizes) != 2 or mode != "constant" or (value or 0) != 0:
                ctx.skip(conv, f"depthwise conv1d input padded by {sizes} ({mode}, value {value}): "
                               "only zero padding of the sequence dim is a causal conv")
                return
            left, src = left + sizes[0], src.args[0]
        length = val(src).shape[2]
        end, start, count, layout, activation = self._output(conv)
        first = start + (k - 1) - left  # conv output t reads inputs up to t + K - 1 - left
        if first < 0 or first + count > length:
            ctx.skip(conv, f"depthwise conv1d (K={k}, left padding {left}) outputs [{start}, {start + count}) "
                           f"of a length-{length} input are not causal-conv positions [0, {length})")
            return
        if self._decode(gm, ctx, conv, src, weight, bias, first, count, end, layout, activation):
            return
        graph = gm.graph
        with graph.inserting_before(end):
            base = src.args[0] if _swaps_last_two(src) else src  # [B, L, C] as the eager code had it
            x = base if base is not src else call(graph, aten.transpose.int, src, 1, 2, like=conv)
            taps = call(graph, aten.reshape.default, weight, [channels, k], like=conv)
            args = dict(x=val(x), weight=val(taps), bias=val(bias), activation=activation)
            backend, rejected = ctx.choose("causal_conv1d", end, **args)
            if backend is None:
                return
            new = call(graph, dsgraph_ops.causal_conv1d.default, x, taps, bias, activation, backend, like=end)
            if first != 0 or count != length:
                new = call(graph, aten.slice.Tensor, new, 1, first, first + count, like=end)
            if layout == "bcl":
                new = call(graph, aten.transpose.int, new, 1, 2, like=end)
        detail = (f"C={channels} K={k} L={length} B={val(src).shape[0]}, {val(src).dtype}, "
                  f"{'bias' if bias is not None else 'no bias'}, activation {activation}, outputs [{first}, "
                  f"{first + count})")
        inputs = [base, weight] + ([bias] if bias is not None else [])
        ctx.commit(gm, op="causal_conv1d", old=end, new=new, inputs=inputs, backend=backend, rejected=rejected,
                   detail=detail)

    def _decode(self, gm: fx.GraphModule, ctx: PassContext, conv: fx.Node, window: fx.Node, weight, bias,
                first: int, count: int, end: fx.Node, layout: str, activation: Optional[str]) -> bool:
        """Rewrite the decode form (module docstring) to ``causal_conv1d_update``; False when ``window``
        is not that form or the op cannot serve it (the caller rewrites the conv alone)."""
        if not _is(window, aten.cat.default) or len(window.args[0]) != 2 or _arg(window, 1, "dim", 0) % 3 != 2:
            return False
        state_in, x_in = window.args[0]
        batch, channels, width = val(window).shape
        k = val(weight).shape[2]
        states = [u for u in window.users if _is(u, aten.slice.Tensor) and _arg(u, 1, "dim", 0) % 3 == 2 and
                  _arg(u, 4, "step", 1) == 1 and _slice_start(u, width) == width - (k - 1) and
                  val(u).shape[2] == k - 1]
        if not states or val(state_in).shape[2] != k - 1 or first < k - 1:
            return False
        where = f"decode form (conv state update, C={channels} K={k})"
        if end in ctx.requires_grad or any(s in ctx.requires_grad for s in states):
            ctx.skip(conv, f"{where} needs gradients; dsgraph::causal_conv1d_update is forward-only (decode): "
                           "the conv alone becomes causal_conv1d")
            return False
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        if any(order[u] < order[conv] for s in states for u in s.users):
            ctx.skip(conv, f"{where}: the new state is used before the conv; the conv alone becomes causal_conv1d")
            return False
        dtype = val(window).dtype
        state = _state_source(state_in, dtype)
        graph = gm.graph
        with graph.inserting_before(conv):  # the new state's users may precede the conv's epilogue
            base = x_in.args[0] if _swaps_last_two(x_in) else x_in  # [B, L, C] as the eager code had it
            x = base if base is not x_in else call(graph, aten.transpose.int, x_in, 1, 2, like=conv)
            if val(x).dtype != dtype:  # cat promoted x to the window's dtype
                x = call(graph, aten.to.dtype, x, dtype, like=conv)
            taps = call(graph, aten.reshape.default, weight, [channels, k], like=conv)
            args = dict(x=val(x), conv_state=val(state), weight=val(taps), bias=val(bias), activation=activation)
            backend, rejected = ctx.choose("causal_conv1d_update", end, **args)
            if backend is None:
                return True
            op = call(graph, dsgraph_ops.causal_conv1d_update.default, x, state, taps, bias, activation, backend,
                      like=end)
            new = call(graph, operator.getitem, op, 0, like=end)
            length = width - (k - 1)
            if first != k - 1 or count != length:
                new = call(graph, aten.slice.Tensor, new, 1, first - (k - 1), first - (k - 1) + count, like=end)
            if layout == "bcl":
                new = call(graph, aten.transpose.int, new, 1, 2, like=end)
        detail = (f"decode form: C={channels} K={k} L={length} B={batch}, x {val(x).dtype}, state {val(state).dtype}, "
                  f"{'bias' if bias is not None else 'no bias'}, activation {activation}, outputs [{first - (k - 1)}, "
                  f"{first - (k - 1) + count}) and the new state")
        inputs = [base, state, weight] + ([bias] if bias is not None else [])
        if ctx.commit(gm, op="causal_conv1d_update", old=end, new=new, inputs=inputs, backend=backend,
                      rejected=rejected, detail=detail):
            with graph.inserting_after(op):
                new_state = call(graph, operator.getitem, op, 1, like=states[0])
            for s in states:
                s.replace_all_uses_with(new_state)
        return True

    @staticmethod
    def _output(conv: fx.Node) -> tuple[fx.Node, int, int, str, Optional[str]]:
        """Walk the single-user chain of crops, transposes, copies and one SiLU after the conv. Returns
        (last node, first conv output kept, how many, its layout "bcl"/"blc", activation)."""
        node, start, layout, activation = conv, 0, "bcl", None
        count = val(conv).shape[2]
        while True:
            silu = _silu_of(node) if activation is None else None
            if silu is not None:
                node, activation = silu, "silu"
                continue
            if len(node.users) != 1:
                break
            user = next(iter(node.users))
            seq_dim = 2 if layout == "bcl" else 1
            if _is(user, *SAME_VALUES):
                node = user
            elif _swaps_last_two(user):
                node, layout = user, "blc" if layout == "bcl" else "bcl"
            elif _is(user, aten.slice.Tensor) and _arg(user, 1, "dim", 0) % 3 == seq_dim and \
                    _arg(user, 4, "step", 1) == 1:
                node, start, count = user, start + _slice_start(user, count), val(user).shape[seq_dim]
            else:
                break
        return node, start, count, layout, activation
