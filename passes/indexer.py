"""Lightning Indexer scores -> ``dsgraph::indexer_scores`` / ``dsgraph::indexer_topk``.

Recognises ``sum_h(weights[..., None] * relu(q · k))`` (DeepSeek V3.2's indexer) where:
- ``q · k`` is ``einsum("bshd,btd->bsht", q, k)`` (any letters and dim orders) or a ``matmul``/``@``
  of q [B, S, H, D] with k transposed and unsqueezed (``k.transpose(-1, -2)[:, None]``); ``.float()``
  casts of q and k are stripped (the op computes in fp32 anyway), transposes/permutes followed,
  positive constant scales of q or k folded into the weights (they commute with the relu);
- the weights multiply the relu output (``w * relu(x)``; never ``relu(w * x)``: weights may be
  negative), broadcast over the keys, or the weighted head sum is ``einsum("bsht,bsh->bst", ...)``;
- the head sum is ``.sum(dim=h)`` (``2`` or ``-2`` in the official layout), optionally followed by
  masks: added (``+ mask``, ``+= mask`` functionalised to an add, ``+ padding[:, 0]``),
  ``masked_fill``ed or ``where``d with -inf (a finite fill such as -1e4 is a value here: no softmax
  follows, so it stays in the graph after the op). Masks from the masks pass fold
  into the op (``band_mask`` -> ``lower``/``upper``); any other mask becomes a compact additive
  ``bias``.

Then: if the scores' only consumer is ``topk`` over the keys (largest, its values not needing
gradients) the site becomes ``indexer_topk`` and the [B, S, T] scores are never built; otherwise
(scores returned, used by the KL loss, top-k values differentiated) it becomes ``indexer_scores``
and any ``topk`` runs on its output.

Constraints (a site outside them is left alone and the report says why): float16/bfloat16/float32
q, k and weights with the product and the head sum in float32 (as the official code casts; a
product in bf16 rounds where the op would not); keys shared by all heads and queries of a batch row; masks that do not need
gradients; on differentiable scores, boolean masks only as bands (a masked_fill zeroes gradients
that an additive bias would pass). The top-k path needs fp32 scores (eager's fp32 weights give
them; a top-k of bf16 scores ranks rounded values), else it is ``indexer_scores`` + ``torch.topk``.
A model that returns the scores from a compiled region (e.g. a layer compiled alone that returns
them) gets ``indexer_scores``: the scores are a graph output there.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from dsgraph.fxutil import CASTS, call, evaluate, is_constant, scalar, val
from dsgraph.pipeline import Pass, PassContext
from .attention import Layout, Product, Reject, _see_through, _Site

aten = torch.ops.aten
dsgraph_ops = torch.ops.dsgraph

SCORE_CASTS = CASTS - {aten.to.device}
PRODUCTS = {aten.einsum.default, aten.matmul.default}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _exact_cast(node: fx.Node) -> bool:
    """A cast the op may skip: float to a float dtype that holds every value of the source (the op
    computes in fp32; a narrowing cast rounds, and skipping it would change the result)."""
    if not (node.op == "call_function" and node.target in SCORE_CASTS):
        return False
    src, dst = val(node.args[0]).dtype, val(node).dtype
    return src in _DTYPES and dst in _DTYPES and torch.promote_types(src, dst) == dst


def _operand(node: fx.Node, sub: str, gm: fx.GraphModule, constant: dict) -> tuple[fx.Node, str, float]:
    """Follow casts between float dtypes the op reads, transposes/permutes/positive scalings
    (attention's ``_see_through``) and unsqueezes (dropping their letter) back to the source."""
    factor = 1.0
    while True:
        node, sub, f = _see_through(node, sub, gm, constant)
        factor *= f
        if node.op != "call_function":
            return node, sub, factor
        if _exact_cast(node):
            node = node.args[0]
        elif node.target is aten.unsqueeze.default:
            dim = node.args[1] % len(sub)
            node, sub = node.args[0], sub[:dim] + sub[dim + 1:]
        else:
            return node, sub, factor


def _relu_input(node: fx.Node) -> Optional[fx.Node]:
    """The argument of ``relu`` (through casts) if ``node`` is one, else None."""
    while _exact_cast(node):
        node = node.args[0]
    if node.op == "call_function" and node.target is aten.relu.default:
        inner = node.args[0]
        while _exact_cast(inner):
            inner = inner.args[0]
        if inner.op == "call_function" and inner.target in PRODUCTS:
            return inner
    return None


class IndexerPass(Pass):
    name = "indexer"
    needs = ("symbolic_masks",)
    provides = ("fused_indexer",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or node.op != "call_function":
                continue
            if node.target in (aten.sum.dim_IntList, aten.einsum.default):
                try:
                    site = _IndexerSite.match(gm, node, ctx)
                    if site is not None:
                        site.rewrite()
                except Reject as exc:
                    ctx.skip(node, str(exc))


class _IndexerSite(_Site):
    """One weighted head sum. Reuses the attention pass's mask splitting and canonicalisation."""

    # The scores are returned or ranked as they are, not softmaxed: only -inf masks (a finite fill
    # such as -1e4 or finfo.min is a value the op would have to reproduce, so it stays in the graph).
    masked_below = float("-inf")

    @classmethod
    def match(cls, gm: fx.GraphModule, node: fx.Node, ctx: PassContext) -> Optional["_IndexerSite"]:
        """The site anchored at a head sum, or None when ``node`` is no indexer head sum."""
        site = cls(gm, node, ctx)
        if node.target is aten.sum.dim_IntList:
            found = site._sum_form(node)
        else:
            found = site._einsum_form(node)
        return site if found else None

    # --- matching -------------------------------------------------------------------------
    def _sum_form(self, node: fx.Node) -> bool:
        x, dims = node.args[0], list(node.args[1] or [])  # None / []: a full reduction
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        mul = x
        while _exact_cast(mul):
            mul = mul.args[0]
        if mul.op != "call_function" or mul.target is not aten.mul.Tensor or val(mul).dim() not in (3, 4):
            return False
        a, b = mul.args[:2]
        for relu_side, other in ((a, b), (b, a)):
            if isinstance(relu_side, fx.Node) and isinstance(other, fx.Node):
                product = _relu_input(relu_side)
                if product is not None:
                    break
        else:
            return False
        rank = val(mul).dim()
        if len(dims) != 1 or keepdim:
            raise Reject(f"head sum over dims {list(dims)} (keepdim={keepdim}): expected one dim, keepdim False")
        self._product(product)
        if list(val(relu_side).shape) != list(val(mul).shape):
            raise Reject("the relu scores are broadcast by the weights multiply")
        # The weights' letters: aligned to the product's from the right (broadcasting).
        w_shape = list(val(other).shape)
        if len(w_shape) > rank:
            raise Reject(f"weights of rank {len(w_shape)} broadcast the rank-{rank} scores up")
        self.w, self.w_sub = other, self.out[rank - len(w_shape):]
        self.h = self.out[dims[0] % rank]
        return True

    def _einsum_form(self, node: fx.Node) -> bool:
        equation, operands = node.args[0].replace(" ", ""), node.args[1]
        if "->" not in equation or "..." in equation or len(operands) != 2:
            return False
        (sub_a, sub_b), out = equation.split("->")[0].split(","), equation.split("->")[1]
        for i in (0, 1):
            product = _relu_input(operands[i])
            if product is not None:
                break
        else:
            return False
        relu_sub, w_sub = (sub_a, sub_b) if i == 0 else (sub_b, sub_a)
        summed = [c for c in relu_sub if c not in out]
        if len(summed) != 1 or summed[0] not in w_sub or sorted(out) != sorted(set(relu_sub) - set(summed)):
            raise Reject(f"einsum {equation!r} is not one weighted sum over the head dim")
        self._product(product)
        if len(relu_sub) != len(self.out):
            raise Reject(f"einsum {equation!r}: relu scores of rank {len(self.out)}")
        rename = dict(zip(relu_sub, self.out))  # the einsum's letters -> the product's
        if any(c not in rename for c in w_sub):
            raise Reject(f"einsum {equation!r}: weights dims outside the scores")
        self.w, self.w_sub, self.h = operands[1 - i], "".join(rename[c] for c in w_sub), rename[summed[0]]
        self.result_sub = "".join(rename[c] for c in out)
        return True

    def _product(self, node: fx.Node) -> None:
        prod = Product.of(node)
        self.product = node
        self.out = prod.out
        self.q, self.q_sub, fq = _operand(prod.a, prod.a_sub, self.gm, self.constant)
        self.k, self.k_sub, fk = _operand(prod.b, prod.b_sub, self.gm, self.constant)
        self.factor = fq * fk  # positive: commutes with the relu, folded into the weights
        self.result_sub = None

    def _roles(self) -> None:
        """Assign b, s, h, t, d among the product letters; raise unless q is [b, s, h, d] and k
        [b, t, d] up to size-1 dims."""
        q_sizes = dict(zip(self.q_sub, val(self.q).shape))
        k_sizes = dict(zip(self.k_sub, val(self.k).shape))
        contracted = [c for c in self.q_sub if c in self.k_sub and c not in self.out]
        if len(contracted) != 1:
            raise Reject(f"the score product contracts {len(contracted)} dims, expected the head dim only")
        self.d = contracted[0]
        if q_sizes.get(self.h, 1) == 1 and val(self.product).shape[self.out.index(self.h)] != 1:
            raise Reject("the summed dim is not a query head dim")
        if k_sizes.get(self.h, 1) != 1:
            raise Reject("keys vary over the summed (head) dim")
        rest = [c for c in self.out if c != self.h]
        k_only = [c for c in rest if q_sizes.get(c, 1) == 1 and k_sizes.get(c, 1) > 1]
        t_candidates = k_only or [c for c in rest if c in self.k_sub and c not in self.q_sub]
        if len(t_candidates) != 1:
            raise Reject("no single key dim in the score product")
        self.t = t_candidates[0]
        rest.remove(self.t)
        q_only = [c for c in rest if k_sizes.get(c, 1) == 1]
        if len(rest) == 1 and q_only:
            self.b, self.s = None, rest[0]
        elif len(rest) == 2 and q_only:
            self.s = q_only[-1]
            self.b = [c for c in rest if c != self.s][0]
            if self.b in q_sizes and self.b in k_sizes and q_sizes[self.b] != k_sizes[self.b]:
                raise Reject("keys broadcast over the batch")
        else:
            raise Reject("keys vary over the queries: not one key per position shared by the heads")
        if not (set(self.w_sub) <= {self.b, self.s, self.h, self.t}) or \
                dict(zip(self.w_sub, val(self.w).shape)).get(self.t, 1) != 1:
            raise Reject("the weights vary over the keys")

    def _consumers(self, anchor: fx.Node):
        """Walk the single-user chain of masks after the head sum. Returns (last node, mask terms)."""
        node, terms = anchor, []
        while len(node.users) == 1:
            user = next(iter(node.users))
            out = val(user)
            if user.op != "call_function" or not isinstance(out, torch.Tensor) or out.shape != val(node).shape:
                break  # not an elementwise step on the scores (e.g. a mask that broadcasts them up)
            target, args = user.target, user.args
            if _exact_cast(user) and args[0] is node:
                pass
            elif target in (aten.add.Tensor, aten.sub.Tensor) and all(isinstance(a, fx.Node) for a in args[:2]):
                alpha = user.kwargs.get("alpha", 1)
                if args[0] is node:  # scores + alpha * mask, scores - alpha * mask
                    terms.append(("add", args[1], -alpha if target is aten.sub.Tensor else alpha))
                elif target is aten.add.Tensor and alpha == 1:  # mask + scores
                    terms.append(("add", args[0], 1.0))
                else:
                    break
            elif target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor) and args[0] is node and \
                    self._fill(args[2]):
                terms.append(("blocked", args[1], self._fill(args[2])))
            elif target in (aten.where.self, aten.where.ScalarOther) and args[1] is node and self._fill(args[2]):
                terms.append(("allowed", args[0], self._fill(args[2])))
            else:
                break
            node = user
        return node, terms

    def _fill(self, value) -> Optional[float]:
        fill = scalar(value, self.gm, self.constant)
        return fill if fill is not None and fill <= self.masked_below else None

    # --- rewriting ------------------------------------------------------------------------
    def rewrite(self) -> None:
        anchor = self.softmax  # _Site's anchor slot: here the head sum
        self._roles()
        dtypes = {val(x).dtype for x in (self.q, self.k, self.w)}
        if not dtypes <= set(_DTYPES):
            raise Reject(f"q, k, weights dtypes {sorted(map(str, dtypes))} outside float16/bfloat16/float32")
        for name, node in (("q . k", self.product), ("the weighted head sum", anchor)):
            if val(node).dtype != torch.float32:  # eager rounds there; the op would not
                raise Reject(f"{name} is computed in {val(node).dtype} (the op computes in float32: cast q, k "
                             "and the weights with .float() as DeepSeek's code does)")
        result_sub = self.result_sub or "".join(c for c in self.out if c != self.h)
        last, terms = self._consumers(anchor)
        topk = self._topk_consumer(last)
        score_order = [c for c in (self.b, self.s, self.t) if c]
        if topk is not None and list(result_sub) != score_order:
            topk = None  # top-k over a transposed layout: keep the scores path
        layout = Layout(self.b, [], self.s, self.t, self.d)
        qk = Product(self.q, self.q_sub, self.k, self.k_sub, result_sub, anchor)
        where = topk if topk is not None else last
        parts = [(term[0], self._split(*term)) for term in terms]
        split = [part for _, term_parts in parts for part in term_parts]
        if topk is None and last in self.ctx.requires_grad and any(
                kind != "add" and any(self._band(n, k, layout, qk) is None and not self._masks_nothing(n, k)
                                      for k, n, _ in term_parts)
                for kind, term_parts in parts):
            raise Reject("a boolean mask other than a band on differentiable scores "
                         "(masked_fill zeroes the gradient there, an additive bias would not)")
        with self.graph.inserting_before(where):
            q = self._arrange(self.q, self.q_sub, [self.b, self.s, self.h, self.d])
            k = self._arrange(self.k, self.k_sub, [self.b, self.t, self.d])
            w = self._arrange(self.w, self.w_sub, [self.b, self.s, self.h])
            if self.factor != 1.0:
                w = call(self.graph, aten.mul.Tensor, w, self.factor, like=anchor)
            lower, upper, index, bias, bias_inputs = self._masks(split, layout, qk, like=anchor)
            if index is not None:
                raise Reject("a top-k index mask on the indexer scores")
            if bias is not None:
                bias = call(self.graph, aten.squeeze.dim, bias, 1, like=anchor)  # [B, 1, S, T] -> [B, S, T]
            args = dict(q=val(q), k=val(k), weights=val(w), bias=val(bias), lower=lower, upper=upper)
            if topk is not None:
                K = topk.args[1]
                backend, rejected = self.ctx.choose("indexer_topk", anchor, topk=K, **args)
                if backend is None:
                    return
                new = call(self.graph, dsgraph_ops.indexer_topk.default, q, k, w, bias, lower, upper, K, backend,
                           like=anchor)
                op, old = "indexer_topk", topk
            else:
                backend, rejected = self.ctx.choose("indexer_scores", anchor, **args)
                if backend is None:
                    return
                new = call(self.graph, dsgraph_ops.indexer_scores.default, q, k, w, bias, lower, upper, backend,
                           like=anchor)
                new = self._restore(new, score_order, result_sub, last)
                op, old = "indexer_scores", last
        inputs = [self.q, self.k, self.w] + bias_inputs
        detail = self._describe(val(q), val(k), lower, upper, bias, topk.args[1] if topk is not None else None)
        self.ctx.commit(self.gm, op=op, old=old, new=new, inputs=inputs, backend=backend, rejected=rejected,
                        detail=detail)

    def _masks_nothing(self, node, kind: str) -> bool:
        """A constant boolean condition that blocks no position (e.g. a causal mask of one query)."""
        if not isinstance(node, fx.Node) or not is_constant(node, self.constant) or kind == "add":
            return False
        value = evaluate(self.gm, node)
        return not bool(value.any()) if kind == "blocked" else bool(value.all())

    def _topk_consumer(self, last: fx.Node) -> Optional[fx.Node]:
        """The ``topk`` node if it is the scores' only consumer and can take the fused path."""
        if len(last.users) != 1:
            return None
        user = next(iter(last.users))
        if user.op != "call_function" or user.target is not aten.topk.default:
            return None
        rank = val(last).dim()
        dim = user.args[2] if len(user.args) > 2 else user.kwargs.get("dim", -1)
        largest = user.args[3] if len(user.args) > 3 else user.kwargs.get("largest", True)
        if dim % rank != rank - 1 or not largest or val(last).dtype != torch.float32:
            return None
        values_used = any(u.args[1] == 0 and u.users for u in user.users)
        if values_used and user in self.ctx.requires_grad:
            return None  # differentiable top-k values: indexer_scores, then torch.topk on it
        return user

    def _arrange(self, node: fx.Node, sub: str, order: list) -> fx.Node:
        """``node`` (letters ``sub``) as the dims ``order`` (None: a size-1 dim), size-1 letters
        outside ``order`` dropped, broadcast dims expanded to the full sizes."""
        sizes = dict(zip(self.out, val(self.product).shape))
        sizes[self.d] = val(self.q).shape[self.q_sub.index(self.d)]
        letters = [c for c in order if c]
        present = [c for c in letters if c in sub]
        extra = [c for c, n in zip(sub, val(node).shape) if c not in present and n != 1]
        if extra:
            raise Reject(f"{node.name} varies over dims {extra} outside {letters}")
        perm = [sub.index(c) for c in present] + [i for i, c in enumerate(sub) if c not in present]
        if perm != list(range(len(perm))):
            node = call(self.graph, aten.permute.default, node, perm, like=self.softmax)
        shape = [val(node).shape[present.index(c)] if c in present else 1 for c in order]
        if shape != list(val(node).shape):
            node = call(self.graph, aten.reshape.default, node, shape, like=self.softmax)
        full = [sizes[c] if c else 1 for c in order]
        if shape != full:
            node = call(self.graph, aten.expand.default, node, full, like=self.softmax)
        return node

    def _restore(self, scores: fx.Node, score_order: list, result_sub: str, last: fx.Node) -> fx.Node:
        """[B, S, T] fp32 -> the eager scores' layout and dtype."""
        if self.b is None:
            scores = call(self.graph, aten.squeeze.dim, scores, 0, like=last)
        perm = [score_order.index(c) for c in result_sub]
        if perm != list(range(len(perm))):
            scores = call(self.graph, aten.permute.default, scores, perm, like=last)
        if val(scores).dtype != val(last).dtype:
            scores = call(self.graph, aten.to.dtype, scores, val(last).dtype, like=last)
        return scores

    @staticmethod
    def _describe(q, k, lower, upper, bias, topk) -> str:
        parts = [f"{q.shape[2]} heads, S={q.shape[1]} T={k.shape[1]} D={q.shape[3]}"]
        if lower is not None or upper is not None:
            parts.append(f"band {lower} <= j-i <= {upper}")
        if bias is not None:
            parts.append(f"bias {list(val(bias).shape)}")
        if topk is not None:
            parts.append(f"top-{topk} of {k.shape[1]}")
        return ", ".join(parts)
