"""The chunked SSD (Mamba2's scan, the paper's "minimal SSD") -> ``dsgraph::ssd_scan``.

Anchored on the intra-chunk decay ``exp(segsum(dt * A))`` (segment sums as a cumsum of a masked
``tril`` copy with the upper triangle filled with -inf, or as a difference of cumsums), the pass
follows the algorithm's dataflow and checks every step's dims by role (batch b, chunk c, position l,
source position s, head h, head dim p, state n), so any einsum letters, operand orders and permuted
layouts match, as do ``matmul``/``@`` products whose operands are permutes of the roles' tensors:

1. scores = C Bᵀ (over n) times the decay, applied to x·dt (over s);
2. each chunk's state: B (x·dt) times ``exp(cs[-1] - cs)`` (over l), cs = cumsum(dt * A);
3. the chunk recurrence: ``exp(segsum(pad(cs[..., -1], (1, 0))))`` applied to ``cat(initial, states)``;
   the last chunk's state is the final state, captured when used (decode cache);
4. the entering state read out by C, times ``exp(cs)``; y = (1) + (4), flattened back to L (the tail
   padding sliced off), ``+ D x`` and ``* silu(z)`` optional.

B and C may be per head or per group expanded with ``repeat_interleave`` or unsqueeze/expand/reshape
(head h reads group h // (H / G)). Constraints (else the site is left alone with the reason): groups
tiled with ``repeat`` (head h reads group h % G) are not the op's grouping; casts only widen; the scan
in ``promote(x.dtype, float32)`` and y returned in x's dtype, as the op does; dt already discretised
(softplus/bias/limits stay in the graph). Whether the graph proves every decay ``exp(dt A)`` <= 1 (dt
from softplus/exp/relu/clamp(min >= 0), A = -(such a value)) goes to the backends as
``decays_bounded``: mamba-ssm's kernels clip decays at 1.

The decode step (the model's ``ssd_step``) -> ``dsgraph::ssd_step``, anchored on ``exp(dt * A)`` with dt
[b, h] and A [h]: ``new = state * exp(dt A)[..., None, None] + (dt[..., None] x)[..., None] * B[:, :, None]``
(either operand order), ``y = new · C`` over n, ``+ D x`` and ``* silu(z)`` optional, B and C per group as
above; the new state (the cache) is the op's second output.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from dsgraph.fxutil import CASTS, call, evaluate, is_constant, val
from dsgraph.pipeline import Pass, PassContext
from .attention import Product, Reject, _see_through

aten = torch.ops.aten
dsgraph_ops = torch.ops.dsgraph

_CASTS = CASTS - {aten.to.device, aten.clone.default}
_PRODUCTS = {aten.einsum.default, aten.matmul.default, aten.bmm.default}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_ZEROS = {aten.zeros_like.default, aten.zeros.default, aten.new_zeros.default}


def _letters(node: fx.Node) -> str:
    return "".join(chr(65 + i) for i in range(val(node).dim()))


def _call(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _widen(node: fx.Node) -> fx.Node:
    """Strip casts that hold every value of their source (the op computes in at least fp32)."""
    while _call(node, *_CASTS) and isinstance(node.args[0], fx.Node):
        src, dst = val(node.args[0]).dtype, val(node).dtype
        if torch.promote_types(src, dst) != dst:
            break
        node = node.args[0]
    return node


def _constant_mask(gm, node, constant, T: int, diagonal: int, blocked: bool) -> bool:
    """``node`` is a constant [T, T] bool equal to ``~tril(ones, diagonal)`` (blocked) or ``tril`` itself."""
    if not isinstance(node, fx.Node) or not is_constant(node, constant) or val(node).shape != (T, T):
        return False
    tril = torch.ones(T, T, dtype=torch.bool).tril(diagonal)
    return torch.equal(evaluate(gm, node).bool().cpu(), ~tril if blocked else tril)


def _masked(gm, node, constant, T, diagonal, fill) -> Optional[fx.Node]:
    """The input of ``masked_fill(v, ~tril(diagonal), fill)`` / ``where(tril(diagonal), v, fill)``."""
    if _call(node, aten.masked_fill.Scalar) and node.args[2] == fill and \
            _constant_mask(gm, node.args[1], constant, T, diagonal, True):
        return node.args[0]
    if _call(node, aten.where.ScalarOther) and node.args[2] == fill and \
            _constant_mask(gm, node.args[0], constant, T, diagonal, False):
        return node.args[1]
    return None


def _segsum_input(gm, node: fx.Node, constant) -> Optional[fx.Node]:
    """``a`` [..., T] if ``node`` is segsum(a) [..., T, T] (see the module docstring), else None."""
    if not isinstance(node, fx.Node) or not isinstance(val(node), torch.Tensor) or val(node).dim() < 2:
        return None
    T = val(node).shape[-1]
    inner = _masked(gm, node, constant, T, 0, float("-inf"))
    if inner is None:
        return None
    if _call(inner, aten.cumsum.default) and inner.args[1] % val(inner).dim() == val(inner).dim() - 2:
        low = _masked(gm, inner.args[0], constant, T, -1, 0)
        if _call(low, aten.expand.default) and _call(low.args[0], aten.unsqueeze.default) and \
                low.args[0].args[1] % val(low).dim() == val(low).dim() - 1:
            return low.args[0].args[0]
    if _call(inner, aten.sub.Tensor):  # cs[..., :, None] - cs[..., None, :]
        a, b = inner.args[:2]
        if _call(a, aten.unsqueeze.default) and _call(b, aten.unsqueeze.default) and a.args[0] is b.args[0]:
            cs, rank = a.args[0], val(inner).dim()
            if a.args[1] % rank == rank - 1 and b.args[1] % rank == rank - 2 and _call(cs, aten.cumsum.default) \
                    and cs.args[1] % val(cs).dim() == val(cs).dim() - 1:
                return cs.args[0]
    return None


def _roles_of(node: fx.Node, known: dict, gm, constant) -> str:
    """Roles of ``node``'s dims when it is a permute/transpose/unsqueeze of a node with known roles
    ('1' marks an unsqueezed dim)."""
    sub = _letters(node)
    base, sub, factor = _see_through(node, sub, gm, constant)
    if factor != 1.0:
        raise Reject(f"{node.name} is scaled by {factor}")
    if base in known:
        return _relabel(sub, known[base])
    if _call(base, aten.unsqueeze.default):
        inner = _roles_of(base.args[0], known, gm, constant)
        dim = base.args[1] % val(base).dim()
        return _relabel(sub, inner[:dim] + "1" + inner[dim:])
    raise Reject(f"{base.name} ({base.target}) is not a tensor of the scan's dataflow")


def _relabel(sub: str, roles: str) -> str:
    """Roles of a view's dims ``A, B, ...``, given ``sub`` (those letters on its base's dims, as
    ``_see_through`` returns them) and the base's ``roles``."""
    return "".join(roles[sub.index(chr(65 + j))] for j in range(len(sub)))


def _product(node: fx.Node, known: dict, gm, constant, contracted: set) -> str:
    """Output roles of a two-operand product whose operands have known roles; raise unless exactly
    the ``contracted`` roles are summed."""
    prod = Product.of(node)
    mapping = {}
    for operand, sub in ((prod.a, prod.a_sub), (prod.b, prod.b_sub)):
        roles = _roles_of(operand, known, gm, constant)
        for letter, role in zip(sub, roles):
            if mapping.setdefault(letter, role) != role:
                raise Reject(f"{node.name}: dim {letter!r} pairs roles {mapping[letter]!r} and {role!r}")
    if len(set(mapping.values())) != len(mapping):
        raise Reject(f"{node.name}: a role appears under two letters")
    out = "".join(mapping.get(c, "?") for c in prod.out)
    summed = set(mapping.values()) - set(out)
    if "?" in out or summed != contracted:
        raise Reject(f"{node.name}: sums roles {sorted(summed)}, expected {sorted(contracted)}")
    return out


def _mul_pair(node: fx.Node, first) -> Optional[fx.Node]:
    """The other operand of ``node = mul(first, other)`` in either order."""
    if _call(node, aten.mul.Tensor) and first in node.args[:2] and node.args[0] is not node.args[1]:
        return node.args[1] if node.args[0] is first else node.args[0]
    return None


def _follow_epilogue(node: fx.Node, x: fx.Node, heads: int) -> tuple[fx.Node, Optional[fx.Node], Optional[fx.Node]]:
    """Follow y through the optional ``+ D[:, None] * x`` skip, ``* silu(z)`` gate and the cast back to
    x's dtype: (the last node the op replaces, D, z). Aliases (``y[:, :L]`` when nothing was padded)
    are looked through."""
    def single_user():
        nonlocal node
        while len(node.users) == 1 and _call(next(iter(node.users)), aten.alias.default):
            node = next(iter(node.users))
        return next(iter(node.users)) if len(node.users) == 1 else None

    D = z = None
    user = single_user()
    other = next((o for o in user.args[:2] if o is not node), None) if _call(user, aten.add.Tensor) else None
    skip = _mul_pair(other, next((o for o in other.args[:2] if _widen(o) is x), None)) \
        if _call(other, aten.mul.Tensor) else None
    if _call(skip, aten.unsqueeze.default) and val(skip).shape == (heads, 1) and len(user.args) == 2:
        D, node = _widen(skip.args[0]), user
    user = single_user()
    gate = _mul_pair(user, node) if _call(user, aten.mul.Tensor) else None
    if _call(gate, aten.silu.default) and val(gate).shape == val(node).shape:
        z, node = _widen(gate.args[0]), user
    user = single_user()
    if _call(user, *_CASTS):
        node = user
    if val(node).dtype != val(x).dtype:
        raise Reject(f"y is returned in {val(node).dtype}, not x's {val(x).dtype} (the op's output dtype)")
    return node, D, z


def _only_user(node: fx.Node, *targets) -> fx.Node:
    users = [u for u in node.users if _call(u, *targets)]
    if len(users) != 1:
        raise Reject(f"{node.name}: expected one {'/'.join(str(t) for t in targets)} user, found {len(users)}")
    return users[0]


_NONNEG = {aten.exp.default, aten.softplus.default, aten.relu.default, aten.sigmoid.default, aten.abs.default}


def _ungrouped(node: fx.Node, head_dim: int) -> fx.Node:
    """The per-group tensor that B or C expands over the heads at ``head_dim`` (``repeat_interleave``, or
    unsqueeze/expand/reshape), else ``node`` itself; groups tiled so that head h reads group h % G are
    rejected (the op reads group h // (H / G))."""
    rank = val(node).dim()
    if _call(node, aten.repeat_interleave.self_int) and len(node.args) >= 3 and node.args[2] % rank == head_dim:
        return node.args[0]
    if _call(node, aten.repeat.default):
        raise Reject("groups expanded with repeat (head h reads group h % G): the op reads group h // (H/G)")
    if _call(node, *_RESHAPES):
        expanded = node.args[0]
        while _call(expanded, aten.clone.default, aten.contiguous.default):
            expanded = expanded.args[0]
        if _call(expanded, aten.expand.default) and _call(expanded.args[0], aten.unsqueeze.default) \
                and val(expanded.args[0].args[0]).dim() == rank:
            if expanded.args[0].args[1] % (rank + 1) != head_dim + 1:
                raise Reject("groups expanded so that head h reads group h % G: not the op's grouping")
            return expanded.args[0].args[0]
    return node


def _nonneg(node) -> bool:
    """The graph proves every value of ``node`` >= 0."""
    node = _widen(node) if isinstance(node, fx.Node) else node
    if _call(node, *_NONNEG):
        return True
    if _call(node, aten.clamp.default, aten.clamp_min.default):
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
        if hi is not None and not (isinstance(hi, (int, float)) and hi >= 0):
            return False
        return (isinstance(lo, (int, float)) and lo >= 0) or (lo is None and _nonneg(node.args[0]))
    return False


def _decays_bounded(dt, A) -> bool:
    """exp(dt * A) <= 1 everywhere: dt >= 0 and A = -(something >= 0)."""
    A = _widen(A)
    return _nonneg(dt) and _call(A, aten.neg.default) and _nonneg(A.args[0])


class SSDPass(Pass):
    name = "ssd"
    provides = ("fused_ssd",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        constant: dict = {}
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or not _call(node, aten.exp.default):
                continue
            a = _segsum_input(gm, node.args[0], constant)
            if a is not None and not any(_call(u, aten.cumsum.default) for u in a.users):
                continue  # the chunk recurrence's decay (its input is no cumsum's input)
            step = _step_inputs(node) if a is None else None
            if a is None and step is None:
                continue
            try:
                if a is not None:
                    _SSDSite(gm, ctx, constant, node, a).rewrite()
                else:
                    _StepSite(gm, ctx, constant, node, *step).rewrite()
            except Reject as exc:
                ctx.skip(node, str(exc))


class _SSDSite:
    def __init__(self, gm, ctx, constant, decay, a):
        self.gm, self.graph, self.ctx, self.constant = gm, gm.graph, ctx, constant
        self.decay, self.a = decay, a

    def roles(self, node, known=None):
        return _roles_of(node, known or self.known, self.gm, self.constant)

    def product(self, node, contracted):
        if not _call(node, *_PRODUCTS):
            raise Reject(f"{node.name} is not a product")
        return _product(node, self.known, self.gm, self.constant, set(contracted))

    # --- inputs --------------------------------------------------------------------------
    def _chunked(self, node: fx.Node, heads_from_groups: bool):
        """[b, c, l, ...] chunks of a sequence input -> (source [b, L, ...], groups expanded?)."""
        if not _call(node, aten.unflatten.int, *_RESHAPES):
            raise Reject(f"{node.name} is not a sequence split into chunks")
        src = node.args[0]
        shape = list(val(node).shape)
        c, l = shape[1], shape[2]
        if list(val(src).shape) != [shape[0], c * l, *shape[3:]]:
            raise Reject(f"{node.name} does not split dim 1 into (chunks, chunk_size)")
        if _call(src, aten.pad.default, aten.constant_pad_nd.default):
            pad = list(src.args[1])
            value = src.args[3] if len(src.args) > 3 else src.kwargs.get("value", 0)
            rank = val(src).dim()
            if len(pad) != 2 * (rank - 1) or any(pad[:-1]) or (value or 0) != 0:
                raise Reject(f"{src.name}: only zero padding at the end of the sequence")
            src = src.args[0]
        self.chunk, self.padded = l, c * l
        src = _widen(src)
        if heads_from_groups:
            src = _ungrouped(src, head_dim=2)
        return _widen(src)

    # --- matching ------------------------------------------------------------------------
    def rewrite(self) -> None:
        gm, a = self.gm, self.a
        base, factor = self.a, 1.0
        sub = _letters(a)
        base, sub, factor = _see_through(a, sub, gm, self.constant)
        dtA = base
        dtc = next((x for x in dtA.args[:2] if isinstance(x, fx.Node) and val(x).dim() == 4), None) \
            if _call(dtA, aten.mul.Tensor) and factor == 1.0 else None
        if dtc is None:
            raise Reject("the decay's input is not dt * A over chunks")
        A = _widen(_mul_pair(dtA, dtc))
        if val(A).dim() != 1:
            raise Reject(f"A of shape {list(val(A).shape)}: expected one value per head")
        self.known = {dtc: "bclh"}
        dt = self._chunked(dtc, False)
        roles_a = _relabel(sub, "bclh")
        if roles_a[-1] != "l" or roles_a[-2] != "c":
            raise Reject(f"dt * A laid out as {roles_a}: the cumsum must run over the chunk positions")
        self.known[a] = roles_a
        self.known[self.decay] = roles_a + "s"
        cs = _only_user(a, aten.cumsum.default)
        self.known[cs] = roles_a

        # 1. scores (C Bᵀ) * decay, applied to x dt
        scored = _only_user(self.decay, aten.mul.Tensor)
        scores = _mul_pair(scored, self.decay)
        if not _call(scores, *_PRODUCTS):
            raise Reject("the decay does not multiply a C·B product")
        prod = Product.of(scores)
        ops = [_see_through(o, _letters(o), gm, self.constant)[0]
               for o in (prod.a, prod.b)]
        for cand_c, cand_b in ((ops[0], ops[1]), (ops[1], ops[0])):
            self.known[cand_c], self.known[cand_b] = "bclhn", "bcshn"
            try:
                if self.product(scores, "n") == self.known[self.decay]:
                    break
            except Reject:
                pass
            del self.known[cand_c], self.known[cand_b]
        else:
            raise Reject("the C·B scores do not line up with the decay (C at the target, B at the source positions)")
        Cc, Bc = cand_c, cand_b
        self.known[scored] = self.known[self.decay]
        y_diag = _only_user(scored, *_PRODUCTS)
        xdt = next(o for o in (Product.of(y_diag).a, Product.of(y_diag).b) if o is not scored)
        xdt = _see_through(xdt, _letters(xdt), gm, self.constant)[0]
        xc = _mul_pair(xdt, next((u for u in xdt.args[:2] if _call(u, aten.unsqueeze.default) and u.args[0] is dtc),
                                 None))
        if xc is None:
            raise Reject("the scores do not apply to x * dt[..., None]")
        self.known[xc] = "bcshp"
        self.known[dtc] = "bcsh"
        self.known[xdt] = "bcshp"
        roles_diag = self.product(y_diag, "s")
        x = self._chunked(xc, False)
        B, C = self._chunked(Bc, True), self._chunked(Cc, True)

        # 2. chunk states: B (x dt exp(cs[-1] - cs)) over l
        self.known.update({xdt: "bclhp", dtc: "bclh", Bc: "bclhn", Cc: "bclhn", xc: "bclhp"})
        states = self._chunk_states(xdt, cs, Bc)
        roles_states = self.product(states, "l")
        # 3. the chunk recurrence
        recurrence, h0 = self._recurrence(states, roles_states, cs, roles_a)
        # 4. the entering state read out by C, decayed by exp(cs)
        roles_rec = self.known[recurrence]
        cdim = roles_rec.index("c")
        prev, final = None, None
        for user in recurrence.users:
            if _call(user, aten.slice.Tensor) and user.args[1] % len(roles_rec) == cdim and \
                    (user.args[2] in (0, None)) and user.args[3] in (-1, val(recurrence).shape[cdim] - 1):
                prev = user
            elif _call(user, aten.select.int) and user.args[1] % len(roles_rec) == cdim and \
                    user.args[2] % val(recurrence).shape[cdim] == val(recurrence).shape[cdim] - 1:
                final = user if user.users else None
            elif user.users:
                raise Reject(f"the chunk states are also read by {user.name}")
        if prev is None:
            raise Reject("no states entering the chunks")
        self.known[prev] = roles_rec
        y_off = _only_user(prev, *_PRODUCTS)
        self.known[Cc] = "bclhn"
        roles_off = self.product(y_off, "n")
        scaled = _only_user(y_off, aten.mul.Tensor)
        self._check_decay(_mul_pair(scaled, y_off), cs, roles_off, lambda n: n is cs)
        total = next((u for u in scaled.users if _call(u, aten.add.Tensor)), None)
        if total is None or set(total.args[:2]) != {scaled, y_diag} or sorted(roles_off) != sorted(roles_diag):
            raise Reject("y is not the sum of the intra-chunk and the entering-state terms")
        if roles_off != roles_diag or roles_off != "bclhp":
            raise Reject(f"y laid out as {roles_off}/{roles_diag}: expected [b, c, l, h, p]")
        self._epilogue(total, x, dt, A, B, C, h0, final)

    def _chunk_states(self, xdt, cs, Bc):
        for user in xdt.users:
            other = _mul_pair(user, xdt)
            if other is None:
                continue
            self._check_decay(other, cs, "bclhp", self._last_minus)
            self.known[user] = "bclhp"
            return _only_user(user, *_PRODUCTS)
        raise Reject("no chunk-state term x dt exp(cs[-1] - cs)")

    def _last_minus(self, node) -> bool:
        """``cs[..., -1:] - cs``."""
        if not _call(node, aten.sub.Tensor) or node.args[1] is not self.known_cs:
            return False
        last = node.args[0]
        rank = val(self.known_cs).dim()
        return _call(last, aten.slice.Tensor) and last.args[0] is self.known_cs and last.args[1] % rank == rank - 1 \
            and last.args[2] in (-1, val(self.known_cs).shape[-1] - 1)

    def _check_decay(self, node, cs, target_roles, inner_ok) -> None:
        """``node`` is a view of exp(f(cs)) with ``inner_ok(f(cs))`` whose roles broadcast to ``target_roles``."""
        self.known_cs = cs
        sub = _letters(node)
        base, sub, factor = _see_through(node, sub, self.gm, self.constant)
        unsq = []
        while _call(base, aten.unsqueeze.default) and factor == 1.0:
            unsq.append(base.args[1] % val(base).dim())
            base = base.args[0]
            base, sub2, factor = _see_through(base, _letters(base), self.gm,
                                              self.constant)
        if not (_call(base, aten.exp.default) and inner_ok(base.args[0])) or factor != 1.0:
            raise Reject(f"{node.name} is not exp(cs) / exp(cs[-1] - cs)")
        self.known[base] = self.known[cs]
        roles = self.roles(node)
        if len(roles) != len(target_roles) or any(r != t and r != "1" for r, t in zip(roles, target_roles)):
            raise Reject(f"{node.name}: decay roles {roles} do not broadcast to {target_roles}")

    def _recurrence(self, states, roles_states, cs, roles_a):
        cat = _only_user(states, aten.cat.default)
        cdim = roles_states.index("c")
        parts = cat.args[0]
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        if len(parts) != 2 or parts[1] is not states or dim % len(roles_states) != cdim:
            raise Reject("the chunk states are not cat(initial, states) over the chunks")
        first = parts[0]
        if not _call(first, aten.unsqueeze.default) or first.args[1] % len(roles_states) != cdim:
            raise Reject("the initial state is not unsqueezed at the chunk dim")
        h0 = _widen(first.args[0])
        if _call(h0, *_ZEROS) or (is_constant(h0, self.constant) and not bool(evaluate(self.gm, h0).any())):
            h0 = None
        elif [r for r in roles_states if r != "c"] != list("bhpn"):
            raise Reject(f"chunk states laid out as {roles_states}: an initial state must be [b, h, p, n]")
        self.known[cat] = roles_states
        rec = _only_user(cat, *_PRODUCTS)
        prod = Product.of(rec)
        decay = next(o for o in (prod.a, prod.b) if o is not cat)
        inner = decay.args[0] if _call(decay, aten.exp.default) else None
        seg = _segsum_input(self.gm, inner, self.constant) if inner is not None else None
        rank = len(roles_a)
        if not (_call(seg, aten.pad.default, aten.constant_pad_nd.default) and list(seg.args[1]) == [1, 0]
                and _call(seg.args[0], aten.select.int) and seg.args[0].args[0] is cs
                and seg.args[0].args[1] % rank == rank - 1 and seg.args[0].args[2] in (-1, val(cs).shape[-1] - 1)):
            raise Reject("the chunk recurrence is not exp(segsum(pad(cs[..., -1], (1, 0))))")
        self.known[decay] = roles_a[:-2] + "zc"
        roles = self.product(rec, "c")
        self.known[rec] = roles.replace("z", "c")
        return rec, h0

    # --- rewriting -----------------------------------------------------------------------
    def _epilogue(self, total, x, dt, A, B, C, h0, final) -> None:
        node = _only_user(total, aten.flatten.using_ints, *_RESHAPES)
        b, L, H, P = val(x).shape
        if list(val(node).shape) != [b, self.padded, H, P]:
            raise Reject("y is not flattened back to [b, L, h, p]")
        if self.padded != L:
            node = _only_user(node, aten.slice.Tensor)
            if node.args[1] != 1 or node.args[2] not in (0, None) or node.args[3] != L:
                raise Reject(f"the padded y is not sliced back to L = {L}")
        D = z = None
        ct = torch.promote_types(val(x).dtype, torch.float32)
        if val(self.decay).dtype != ct or val(node).dtype != ct:
            raise Reject(f"the scan runs in {val(node).dtype}; the op computes in {ct}")
        node, D, z = _follow_epilogue(node, x, H)
        for name, t in (("dt", dt), ("B", B), ("C", C)):
            if t is None or not isinstance(val(t), torch.Tensor):
                raise Reject(f"{name} not found")
        args = dict(x=val(x), dt=val(dt), A=val(A), B=val(B), C=val(C), chunk_size=self.chunk, D=val(D), z=val(z),
                    initial_states=val(h0), decays_bounded=_decays_bounded(dt, A))
        backend, rejected = self.ctx.choose("ssd_scan", self.decay, **args)
        if backend is None:
            return
        with self.graph.inserting_after(node):
            op = call(self.graph, dsgraph_ops.ssd_scan.default, x, dt, A, B, C, D, z, h0, self.chunk, backend,
                      like=self.decay)
        with self.graph.inserting_after(op):
            y = call(self.graph, operator.getitem, op, 0, like=node)
        inputs = [t for t in (x, dt, A, B, C, D, z, h0) if t is not None]
        detail = (f"{H} heads x {P}, {val(B).shape[2]} groups, state {val(B).shape[3]}, L={L} chunk {self.chunk}"
                  + "".join(f", {n}" for n, t in (("D", D), ("z gate", z), ("initial state", h0),
                                                   ("final state", final)) if t is not None))
        if self.ctx.commit(self.gm, op="ssd_scan", old=node, new=y, inputs=inputs, backend=backend,
                           rejected=rejected, detail=detail) and final is not None:
            with self.graph.inserting_after(y):  # the final state is the same op's second output
                final.replace_all_uses_with(call(self.graph, operator.getitem, op, 1, like=final))


def _step_inputs(decay: fx.Node) -> Optional[tuple[fx.Node, fx.Node, fx.Node]]:
    """(dt [b, h], A [h], decay[..., None, None]) if ``decay`` is exp(dt * A) broadcast over a
    [b, h, p, n] state (one decode step), else None (other exps are not reported)."""
    prod = decay.args[0]
    if not _call(prod, aten.mul.Tensor) or val(decay).dim() != 2:
        return None
    first = next((u for u in decay.users if _call(u, aten.unsqueeze.default)), None)
    second = next((u for u in first.users if _call(u, aten.unsqueeze.default)), None) if first else None
    if second is None or not _unsqueezed(second, decay, (2, 3)):
        return None
    for dt, A in (prod.args[:2], prod.args[1::-1]):
        if isinstance(dt, fx.Node) and isinstance(A, fx.Node) and val(dt).shape == val(decay).shape \
                and val(A).dim() == 1 and val(A).shape[0] == val(dt).shape[1]:
            return dt, A, second
    return None


def _unsqueezed(node, base: fx.Node, dims: tuple) -> bool:
    """``node`` is ``base`` with size-1 dims inserted at ``dims`` (of the result), in order."""
    for dim in reversed(dims):
        if not (_call(node, aten.unsqueeze.default) and node.args[1] % val(node).dim() == dim):
            return False
        node = node.args[0]
    return node is base


class _StepSite:
    """One decode step (see the module docstring); every product is checked by dims' roles."""

    def __init__(self, gm, ctx, constant, decay, dt, A, decay4):
        self.gm, self.graph, self.ctx, self.constant = gm, gm.graph, ctx, constant
        self.decay, self.dtc, self.Ac, self.decay4 = decay, dt, A, decay4

    def _per_group(self, node: fx.Node, b: int, H: int) -> fx.Node:
        """B/C [b, h, n] -> the [b, g, n] tensor they expand (per head: itself)."""
        node = _widen(node)
        groups = _ungrouped(node, head_dim=1)
        if groups is not node:
            return _widen(groups)
        if list(val(node).shape[:2]) != [b, H]:
            raise Reject(f"{node.name}: B/C of shape {list(val(node).shape)}, expected [b, h, n]")
        return node

    def rewrite(self) -> None:
        decay, dtc, decay4 = self.decay, self.dtc, self.decay4
        b, H = val(dtc).shape
        ct = val(decay).dtype
        decayed = _only_user(decay4, aten.mul.Tensor)  # state * decay[..., None, None]
        state_c = _mul_pair(decayed, decay4)
        if state_c is None or val(state_c).dim() != 4 or list(val(state_c).shape[:2]) != [b, H]:
            raise Reject("the decay does not multiply a [b, h, p, n] state")
        P, N = val(state_c).shape[2:]
        new = _only_user(decayed, aten.add.Tensor)
        inject = next((o for o in new.args[:2] if o is not decayed), None)
        if not _call(inject, aten.mul.Tensor) or len(new.args) > 2 or new.kwargs.get("alpha", 1) != 1:
            raise Reject("the state update is not state * decay + (dt x) B")
        # (dt[..., None] * x)[..., None] * B[:, :, None, :]
        x_c = B_h = None
        for u, v in (inject.args[:2], inject.args[1::-1]):
            if _call(u, aten.unsqueeze.default) and u.args[1] % 4 == 3 and _call(u.args[0], aten.mul.Tensor) \
                    and _call(v, aten.unsqueeze.default) and v.args[1] % 4 == 2:
                dt1 = next((o for o in u.args[0].args[:2] if _unsqueezed(o, dtc, (2,))), None)
                x_c = _mul_pair(u.args[0], dt1) if dt1 is not None else None
                B_h = v.args[0]
                break
        if x_c is None or list(val(x_c).shape) != [b, H, P] or list(val(B_h).shape) != [b, H, N]:
            raise Reject("the state's input term is not (dt[..., None] * x)[..., None] * B[:, :, None]")
        # y = new · C over n
        readout = [u for u in new.users if _call(u, *_PRODUCTS)]
        if len(readout) != 1:
            raise Reject(f"the new state is read by {len(readout)} products, expected one (C)")
        y = readout[0]
        prod = Product.of(y)
        C_h = prod.b if prod.a is new else prod.a
        known = {new: "bhpn", C_h: "bhn"}
        if _product(y, known, self.gm, self.constant, {"n"}) != "bhp":
            raise Reject("y is not the new state read out by C over n")
        x, A = _widen(x_c), _widen(self.Ac)
        dt, state = _widen(dtc), _widen(state_c)
        B, C = self._per_group(B_h, b, H), self._per_group(C_h, b, H)
        if val(B).shape != val(C).shape or H % val(B).shape[1]:
            raise Reject(f"B {list(val(B).shape)} and C {list(val(C).shape)}: expected [b, g, n] with g dividing h")
        want = torch.promote_types(val(x).dtype, torch.float32)
        if ct != want or val(y).dtype != want or val(new).dtype != want:
            raise Reject(f"the step runs in {val(new).dtype}; the op computes in {want}")
        node, D, z = _follow_epilogue(y, x, H)
        if node in self.ctx.requires_grad or new in self.ctx.requires_grad:
            raise Reject("the step needs gradients; dsgraph::ssd_step is forward-only (decode)")
        backend, rejected = self.ctx.choose("ssd_step", decay, state=val(state), x=val(x), dt=val(dt), A=val(A),
                                            B=val(B), C=val(C), D=val(D), z=val(z))
        if backend is None:
            return
        with self.graph.inserting_after(node):
            op = call(self.graph, dsgraph_ops.ssd_step.default, state, x, dt, A, B, C, D, z, backend, like=y)
        with self.graph.inserting_after(op):
            out = call(self.graph, operator.getitem, op, 0, like=node)
        detail = (f"{H} heads x {P}, {val(B).shape[1]} groups, state {N}, batch {b}"
                  + "".join(f", {n}" for n, t in (("D", D), ("z gate", z)) if t is not None))
        inputs = [t for t in (state, x, dt, A, B, C, D, z) if t is not None]
        if self.ctx.commit(self.gm, op="ssd_step", old=node, new=out, inputs=inputs, backend=backend,
                           rejected=rejected, detail=detail):
            with self.graph.inserting_after(out):  # the new state (the cache) is the op's second output
                new.replace_all_uses_with(call(self.graph, operator.getitem, op, 1, like=new),
                                          delete_user_cb=lambda user: user is not y)
