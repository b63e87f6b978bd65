"""dsgraph::ssd_scan / ssd_step kernels: the torch reference against the model's chunked and step-by-step
SSD (float64, gradients included), argument checks, the Triton step against the reference (interpreter on
CPU), the default policy's step order, and (GPU) the mamba_ssm and Triton backends against the reference."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import dsgraph  # noqa: F401  (registers the dsgraph:: ops)
from dsgraph import registry
from dsgraph.kernels import ssd_mamba, ssd_ref, ssd_triton
from dsgraph.policy import BACKENDS, Policy
from dsgraph.models.nemotron_v3 import ssd_chunked, ssd_naive, ssd_step

scan = torch.ops.dsgraph.ssd_scan
step = torch.ops.dsgraph.ssd_step
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "initial_states")


def _scan_inputs(b, L, H, P, G, N, *, D=True, z=True, h0=True, dtype=torch.float64, device="cpu", seed=0):
    """Inputs as the model makes them: dt = softplus(...) > 0, A < 0 (decays in (0, 1])."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(device)  # noqa: E731
    args = dict(x=r(b, L, H, P).to(dtype), dt=F.softplus(r(b, L, H) - 2).float(), A=-torch.exp(r(H, scale=0.5)).float(),
                B=r(b, L, G, N).to(dtype), C=r(b, L, G, N).to(dtype), D=r(H).float() if D else None,
                z=r(b, L, H, P).to(dtype) if z else None, initial_states=r(b, H, P, N).float() if h0 else None)
    if dtype == torch.float64:  # all float64 for the exact comparisons
        args = {k: None if v is None else v.double() for k, v in args.items()}
    return args


def _run_op(args, chunk, backend, cotangents=None):
    """(y, final, grads by name) of dsgraph::ssd_scan; grads of sum(y * gy) + sum(final * gf)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items() if v is not None}
    full = [leaves.get(k) for k in NAMES]
    y, final, _ = scan(*full, chunk, backend)
    if cotangents is None:
        return y, final, {}
    gy, gf = cotangents
    grads = torch.autograd.grad((y * gy).sum() + (final * gf).sum(), list(leaves.values()))
    return y, final, dict(zip(leaves, grads))


def _model_scan(args, chunk, cotangents, naive=False):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items() if v is not None}
    full = [leaves.get(k) for k in NAMES]
    if naive:
        y, final = ssd_naive(*full[:5], D=full[5], z=full[6], initial_states=full[7])
    else:
        y, final = ssd_chunked(*full[:5], chunk, D=full[5], z=full[6], initial_states=full[7])
    gy, gf = cotangents
    grads = torch.autograd.grad((y * gy).sum() + (final * gf).sum(), list(leaves.values()))
    return y, final, dict(zip(leaves, grads))


@given(b=st.integers(1, 2), L=st.integers(1, 23), G=st.integers(1, 2), R=st.integers(1, 2), P=st.sampled_from([1, 3]),
       N=st.sampled_from([1, 4]), chunk=st.integers(1, 9), D=st.booleans(), z=st.booleans(), h0=st.booleans(),
       tiny_blocks=st.booleans())
def test_reference_scan_equals_the_models_ssd_float64(b, L, G, R, P, N, chunk, D, z, h0, tiny_blocks):
    """Outputs, final state and every gradient equal the model's chunked SSD and the step-by-step
    recurrence, any L (tail chunk padded); ``tiny_blocks`` forces one chunk per block (the blocked
    forward and the block-by-block recomputing backward)."""
    args = _scan_inputs(b, L, G * R, P, G, N, D=D, z=z, h0=h0)
    g = torch.Generator().manual_seed(1)
    cot = (torch.randn(b, L, G * R, P, generator=g, dtype=torch.float64),
           torch.randn(b, G * R, P, N, generator=g, dtype=torch.float64))
    old = ssd_ref._BLOCK_BYTES
    ssd_ref._BLOCK_BYTES = 1 if tiny_blocks else old
    try:
        got = _run_op(args, chunk, "torch", cot)
    finally:
        ssd_ref._BLOCK_BYTES = old
    for oracle in (_model_scan(args, chunk, cot), _model_scan(args, chunk, cot, naive=True)):
        torch.testing.assert_close(got[0], oracle[0])
        torch.testing.assert_close(got[1], oracle[1])
        for name in oracle[2]:
            torch.testing.assert_close(got[2][name], oracle[2][name], msg=lambda m: f"d{name}: {m}")


def test_reference_scan_dtypes_and_residual():
    """bf16 inputs: y and the residual in bf16, the final state in fp32; the residual is y before the
    z gate (empty without z)."""
    args = _scan_inputs(2, 10, 4, 3, 2, 5, dtype=torch.bfloat16)
    y, final, residual = scan(*[args[k] for k in NAMES], 4, "torch")
    assert (y.dtype, final.dtype, residual.dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)
    ungated, _, empty = scan(*[args[k] for k in NAMES[:6]], None, args["initial_states"], 4, "torch")
    assert empty.numel() == 0
    torch.testing.assert_close(residual, ungated)
    torch.testing.assert_close(y, (ungated.float() * F.silu(args["z"].float())).bfloat16())


@given(b=st.integers(1, 2), G=st.integers(1, 2), R=st.integers(1, 3), P=st.sampled_from([1, 3]),
       N=st.sampled_from([1, 4]), D=st.booleans(), z=st.booleans())
def test_reference_step_equals_the_models_step_and_a_scan_of_one(b, G, R, P, N, D, z):
    H = G * R
    args = _scan_inputs(b, 1, H, P, G, N, D=D, z=z)
    state, x, dt, B, C = args["initial_states"], args["x"][:, 0], args["dt"][:, 0], args["B"][:, 0], args["C"][:, 0]
    zs = None if args["z"] is None else args["z"][:, 0]
    y, new = step(state, x, dt, args["A"], B, C, args["D"], zs, "torch")
    y_model, new_model = ssd_step(state, x, dt, args["A"], B, C, args["D"])
    if zs is not None:
        y_model = y_model * F.silu(zs)
    torch.testing.assert_close(y, y_model)
    torch.testing.assert_close(new, new_model)
    y_scan, final, _ = scan(*[args[k] for k in NAMES], 1, "torch")
    torch.testing.assert_close(y, y_scan[:, 0])
    torch.testing.assert_close(new, final)


def test_opcheck():
    args = _scan_inputs(1, 6, 2, 2, 1, 3)
    torch.library.opcheck(scan, (*[args[k].clone().requires_grad_() for k in NAMES], 4, "torch"))
    # ssd_step is forward-only (decode): no input requires grad.
    torch.library.opcheck(step, (args["initial_states"], args["x"][:, 0], args["dt"][:, 0], args["A"],
                                 args["B"][:, 0], args["C"][:, 0], args["D"], args["z"][:, 0], "torch"))


@pytest.mark.parametrize("change, message", [
    (dict(x=torch.zeros(2, 5, 4)), "x must be [B, L, H, P]"),
    (dict(B=torch.zeros(2, 5, 3, 3)), "B must be [B, L, G, N]"),
    (dict(dt=torch.zeros(2, 5, 3)), "dt must have shape [2, 5, 4]"),
    (dict(A=torch.zeros(2)), "A must have shape [4]"),
    (dict(C=torch.zeros(2, 5, 2, 4)), "C must have shape [2, 5, 2, 3]"),
    (dict(D=torch.zeros(4, 2)), "D must have shape [4]"),
    (dict(z=torch.zeros(2, 5, 4, 3)), "z must have shape [2, 5, 4, 2]"),
    (dict(initial_states=torch.zeros(2, 4, 2, 2)), "initial_states must have shape [2, 4, 2, 3]"),
    (dict(chunk_size=0), "chunk_size must be an int >= 1"),
])
def test_bad_arguments_are_named(change, message):
    args = dict(x=torch.zeros(2, 5, 4, 2), dt=torch.zeros(2, 5, 4), A=torch.zeros(4), B=torch.zeros(2, 5, 2, 3),
                C=torch.zeros(2, 5, 2, 3), D=None, z=None, initial_states=None, chunk_size=4)
    args.update(change)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        scan(*[args[k] for k in NAMES], args["chunk_size"], "torch")


def test_bad_step_arguments_are_named():
    state, x, dt = torch.zeros(2, 4, 2, 3), torch.zeros(2, 4, 2), torch.zeros(2, 4)
    A, B = torch.zeros(4), torch.zeros(2, 2, 3)
    with pytest.raises(ValueError, match="x must be"):
        step(state, x[:, None], dt, A, B, B, None, None, "torch")
    with pytest.raises(ValueError, match="B must be"):
        step(state, x, dt, A, B[:, None], B, None, None, "torch")
    with pytest.raises(ValueError, match="initial_states must have shape"):
        step(state[..., :2], x, dt, A, B, B, None, None, "torch")


def test_mamba_backend_says_why_it_cannot_serve():
    args = _scan_inputs(1, 32, 4, 16, 2, 16, dtype=torch.float32)
    ok = dict(chunk_size=16, decays_bounded=True)
    assert "clip" in ssd_mamba.scan_unsupported(**args, chunk_size=16)  # decays not proven <= 1
    assert "power of two in [16, 256]" in ssd_mamba.scan_unsupported(**args, **{**ok, "chunk_size": 24})
    assert "power of two in [16, 256]" in ssd_mamba.scan_unsupported(**args, **{**ok, "chunk_size": 8})
    big = dict(args, x=torch.zeros(1, 32, 4, 512))
    assert "at most 256" in ssd_mamba.scan_unsupported(**big, **ok)
    if not torch.cuda.is_available():
        assert "CUDA" in ssd_mamba.scan_unsupported(**args, **ok)
    s = args["initial_states"].double()
    assert "fp32 state" in ssd_mamba.step_unsupported(s, args["x"][:, 0], args["dt"][:, 0], args["A"],
                                                        args["B"][:, 0], args["C"][:, 0])


# ------------------------------------------------------------------------------------------------------
# GPU: the mamba_ssm backend against the reference (same inputs, the reference computes in fp32)
# ------------------------------------------------------------------------------------------------------
def _close(name, got, want, tol):
    """Max error relative to the reference's largest magnitude (the kernels' bf16/tf32 tl.dot inputs
    make elementwise relative errors meaningless near zero)."""
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item() or 1.0
    assert err <= tol * scale, \
        f"{name}: max error {err:.3g} > {tol} x max|ref| {scale:.3g} ({err / scale:.3g} relative)"
    return err / scale


def _needs_mamba():
    reason = ssd_mamba.mamba_unavailable("ops.triton.ssd_combined", "ops.triton.selective_state_update")
    if reason:
        pytest.skip(f"mamba-ssm unavailable: {reason}")


# bf16: its kernels feed bf16 to tl.dot (like the inputs); fp32: tf32 dots.
TOLS = {torch.bfloat16: 5e-2, torch.float32: 1e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("L", [256, 300], ids=["L256", "L300"])
@pytest.mark.parametrize("D, z, h0", [(False, False, False), (True, True, True), (True, False, True),
                                      (False, True, False)], ids=["plain", "D-z-h0", "D-h0", "z"])
def test_gpu_mamba_scan_matches_reference(dtype, L, D, z, h0):
    _needs_mamba()
    args = _scan_inputs(2, L, 8, 64, 2, 32, D=D, z=z, h0=h0, dtype=dtype, device="cuda")
    chunk = 64
    reason = ssd_mamba.scan_unsupported(**args, chunk_size=chunk, decays_bounded=True)
    assert reason is None, reason
    g = torch.Generator(device="cuda").manual_seed(1)
    cot = (torch.randn(2, L, 8, 64, device="cuda", generator=g).to(dtype),
           torch.randn(2, 8, 64, 32, device="cuda", generator=g))
    y, final, grads = _run_op(args, chunk, "mamba_ssm", cot)
    y_ref, final_ref, grads_ref = _run_op(args, chunk, "torch", cot)
    assert y.dtype == dtype and final.dtype == torch.float32 and final.shape == final_ref.shape
    tol = TOLS[dtype]
    errors = {"y": _close("y", y, y_ref, tol), "final": _close("final state", final, final_ref, tol)}
    for name in grads_ref:
        assert grads[name].dtype == grads_ref[name].dtype and grads[name].shape == grads_ref[name].shape, name
        errors[f"d{name}"] = _close(f"d{name}", grads[name], grads_ref[name], tol)
    print({k: f"{v:.2e}" for k, v in errors.items()})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("D, z", [(False, False), (True, True)], ids=["plain", "D-z"])
def test_gpu_mamba_step_matches_reference(dtype, D, z):
    _needs_mamba()
    args = _scan_inputs(3, 1, 8, 64, 2, 128, D=D, z=z, h0=True, dtype=dtype, device="cuda")
    state = args["initial_states"]
    inputs = (state, args["x"][:, 0], args["dt"][:, 0], args["A"], args["B"][:, 0], args["C"][:, 0], args["D"],
              None if args["z"] is None else args["z"][:, 0])
    assert ssd_mamba.step_unsupported(*inputs[:6], D=inputs[6], z=inputs[7]) is None
    before = state.clone()
    y, new = step(*inputs, "mamba_ssm")
    y_ref, new_ref = step(*inputs, "torch")
    assert torch.equal(state, before), "the op must not update its state input in place"
    assert y.dtype == dtype and new.dtype == torch.float32
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # elementwise fp32 math; bf16 only rounds y (1-2 ulps)
    print({"y": f"{_close('y', y, y_ref, tol):.2e}", "state": f"{_close('new state', new, new_ref, 1e-5):.2e}"})


# ------------------------------------------------------------------------------------------------------
# The Triton step (out of place, one pass over the state) against the reference; the default policy's order
# ------------------------------------------------------------------------------------------------------
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the Triton interpreter
STEP_NAMES = ("state", "x", "dt", "A", "B", "C", "D", "z")
EPS32 = 2.0 ** -24
DEFAULT_TOLS = {torch.bfloat16: (1.6e-2, 1e-5), torch.float16: (1e-3, 1e-5), torch.float32: (1.3e-6, 1e-5)}
NEMOTRON_DECODE = dict(b=32, H=128, P=64, G=8, N=128)


def _noncontiguous(t):
    """t's values in a view with reversed, padded strides (every other element of a transposed buffer)."""
    buf = t.new_zeros([2 * s + 1 for s in reversed(t.shape)])
    view = buf.permute(*reversed(range(t.dim())))[tuple(slice(1, None, 2) for _ in t.shape)]
    view.copy_(t)
    return view


def _step_inputs(b, H, P, G, N, *, D, z, dtype, growth=False, strided=False, device=DEVICE, seed=0):
    """fp32 state, x/B/C/z in ``dtype``, dt = softplus(...) > 0, A < 0; ``growth``: A > 0 (decays above 1,
    which mamba-ssm would clip); ``strided``: every input a non-contiguous view."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    A = torch.exp(r(H) * 0.5) * (0.25 if growth else -1.0)
    args = dict(state=r(b, H, P, N), x=r(b, H, P).to(dtype), dt=F.softplus(r(b, H) - 2), A=A,
                B=r(b, G, N).to(dtype), C=r(b, G, N).to(dtype), D=r(H) if D else None,
                z=r(b, H, P).to(dtype) if z else None)
    args = {k: None if v is None else v.to(device) for k, v in args.items()}
    return {k: _noncontiguous(v) if strided and v is not None else v for k, v in args.items()}


def _check_step(args, y, new):
    """Against the reference in float64. The new state: fp32 defaults (elementwise math). y: the dtype's
    default tolerances plus the fp32 rounding bound of the kernel's sum over N in any order,
    4 (N + 4) eps32 times the sum of its terms' magnitudes (computed from the float64 values)."""
    wide = {k: None if v is None else v.double() for k, v in args.items()}
    y64, new64 = ssd_ref.ssd_step_ref(**wide)
    assert y.dtype == args["x"].dtype and new.dtype == torch.float32 and new.shape == new64.shape
    torch.testing.assert_close(new, new64.float())
    H, N = new64.shape[1], new64.shape[3]
    C = wide["C"].abs().repeat_interleave(H // wide["C"].shape[1], 1)
    mag = torch.einsum("bhpn,bhn->bhp", new64.abs(), C)
    if wide["D"] is not None:
        mag = mag + (wide["D"][:, None] * wide["x"]).abs()
    if wide["z"] is not None:
        mag = mag * F.silu(wide["z"]).abs()
    rtol, atol = DEFAULT_TOLS[y.dtype]
    err = (y.double() - y64).abs()
    allowed = rtol * y64.abs() + atol + 4 * (N + 4) * EPS32 * mag
    assert (err <= allowed).all(), \
        f"y: error {err.max().item():.3g}, exceeds the bound by {(err - allowed).max().item():.3g}"


@given(b=st.integers(1, 2), G=st.integers(1, 3), R=st.integers(1, 3), P=st.integers(1, 9),
       N=st.one_of(st.integers(1, 33), st.sampled_from([64, 100, 128, 256])), D=st.booleans(), z=st.booleans(),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), strided=st.booleans(),
       growth=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_triton_step_equals_reference(b, G, R, P, N, D, z, dtype, strided, growth, seed):
    """Any P and N (padded tiles, several P blocks), groups shared by R heads, D and z on or off, any x
    dtype, inputs read through their strides, decays above 1 not clipped; the old state is untouched."""
    args = _step_inputs(b, G * R, P, G, N, D=D, z=z, dtype=dtype, growth=growth, strided=strided, seed=seed)
    assert ssd_triton.step_unsupported(**args) is None
    before = {k: v.clone() for k, v in args.items() if v is not None}
    y, new = step(*[args[k] for k in STEP_NAMES], "triton")
    _check_step(args, y, new)
    for k, v in before.items():
        assert torch.equal(args[k], v), f"{k} changed: the step must be out of place"


def test_triton_step_opcheck():
    args = _step_inputs(2, 4, 5, 2, 6, D=True, z=True, dtype=torch.bfloat16, strided=True)
    assert not any(v.is_contiguous() for v in args.values())
    torch.library.opcheck(step, (*[args[k] for k in STEP_NAMES], "triton"))


def test_triton_step_says_why_it_cannot_serve(monkeypatch):
    ok = _step_inputs(1, 2, 3, 1, 4, D=True, z=True, dtype=torch.bfloat16)
    assert ssd_triton.step_unsupported(**ok) is None
    cases = [(dict(state=ok["state"].double()), "fp32 state"),
             (dict(x=ok["x"].double()), "outside float16/bfloat16/float32"),
             (dict(z=ok["z"].to(torch.int32)), "'z': 'torch.int32'"),
             (dict(B=torch.zeros(1, 1, 257, device=DEVICE), C=torch.zeros(1, 1, 257, device=DEVICE),
                   state=torch.zeros(1, 2, 3, 257, device=DEVICE)), "N = 257 > 256"),
             ({k: v.to("meta") for k, v in ok.items()}, "device meta not supported")]
    for change, message in cases:
        args = {**ok, **change}
        assert message in ssd_triton.step_unsupported(**args), change.keys()
        with pytest.raises(ValueError, match="ssd_step \\(triton\\)"):
            ssd_triton.step_forward(**args)
    monkeypatch.setattr(ssd_triton, "_INTERPRET", False)
    cpu = {k: v.cpu() for k, v in ok.items()}
    assert "needs TRITON_INTERPRET=1" in ssd_triton.step_unsupported(**cpu)


def _serve_everything(monkeypatch, op):
    """A (mocked) CUDA site: every registered kernel of ``op`` says it can serve."""
    for backend, impl in list(registry._KERNELS[op].items()):
        monkeypatch.setitem(registry._KERNELS[op], backend, dataclasses.replace(impl, unsupported=lambda **kw: None))


def test_auto_policy_prefers_triton_for_the_step_only(monkeypatch):
    """The default order puts triton before mamba_ssm for ssd_step (no state copy) without forcing it;
    ssd_scan (and the other ops) keep mamba_ssm first; a user's order or per-op choice is theirs."""
    auto = Policy.preset("auto")
    order = auto.backends_for("ssd_step")
    assert sorted(order) == sorted(BACKENDS) and order.index("triton") < order.index("mamba_ssm")
    assert auto.backends_for("ssd_scan") == auto.backends_for("gated_rmsnorm") == BACKENDS
    assert not auto.is_forced("ssd_step") and not Policy.preset("autotune").is_forced("ssd_step")
    assert Policy(order=("mamba_ssm", "triton", "torch")).backends_for("ssd_step") == ("mamba_ssm", "triton", "torch")
    assert Policy.preset("reference").backends_for("ssd_step") == ("torch",)

    args = _step_inputs(1, 2, 3, 1, 4, D=True, z=True, dtype=torch.bfloat16, device="cpu")
    # A plain CPU (no interpreter): neither GPU backend serves; torch does, each reason on the way.
    monkeypatch.setattr(ssd_triton, "_INTERPRET", False)
    choice = registry.choose("ssd_step", auto, "test", **args)
    assert choice.backend == "torch", choice
    assert list(choice.rejected) == ["tilelang", "sdpa", "triton", "mamba_ssm", "flex"], choice
    assert "TRITON_INTERPRET" in choice.rejected["triton"] and "CUDA" in choice.rejected["mamba_ssm"], choice

    _serve_everything(monkeypatch, "ssd_step")
    _serve_everything(monkeypatch, "ssd_scan")
    assert registry.choose("ssd_step", auto, "test", **args).backend == "triton"
    scan_args = _scan_inputs(1, 4, 2, 3, 1, 4, dtype=torch.float32)
    assert registry.choose("ssd_scan", auto, "test", **scan_args, chunk_size=4).backend == "mamba_ssm"
    # A user's choice stays forced; a forced backend that has no kernel falls back in the op's own order.
    user = Policy.parse("auto;ssd_step=mamba_ssm,torch")
    assert user.is_forced("ssd_step") and registry.choose("ssd_step", user, "test", **args).backend == "mamba_ssm"
    assert registry.choose("ssd_step", Policy.preset("tilelang"), "test", **args).backend == "triton"


def test_auto_policy_serves_the_models_step_with_triton():
    """Through the pass: with the interpreter (or a GPU) "auto" gives the model's decode step to triton,
    reading the slices the graph hands it; the output and the new state equal eager."""
    from dsgraph.models.nemotron_v3 import ssd_step as model_step
    from dsgraph.passes import SSDPass
    from dsgraph.testing import assert_rewrites

    args = _step_inputs(2, 4, 3, 2, 5, D=True, z=False, dtype=torch.float32)
    inputs = [args[k] for k in STEP_NAMES[:7]]
    report = assert_rewrites(model_step, inputs, pass_name="ssd", passes=[SSDPass()], policy="auto", grads=False)
    assert [(r.op, r.backend) for r in report.rewrites] == [("ssd_step", "triton")], report


# ------------------------------------------------------------------------------------------------------
# GPU: the Triton step at Nemotron decode sizes, against the reference and the mamba_ssm backend
# ------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("D, z", [(False, False), (True, True)], ids=["plain", "D-z"])
def test_gpu_triton_step_at_nemotron_decode_sizes(strided, D, z):
    args = _step_inputs(**NEMOTRON_DECODE, D=D, z=z, dtype=torch.bfloat16, strided=strided, device="cuda")
    assert ssd_triton.step_unsupported(**args) is None
    before = args["state"].clone()
    y, new = step(*[args[k] for k in STEP_NAMES], "triton")
    assert torch.equal(args["state"], before), "the op must not update its state input in place"
    _check_step(args, y, new)


@pytest.mark.gpu
def test_gpu_triton_step_matches_mamba_ssm_and_is_faster():
    """Same y and state as mamba-ssm's selective_state_update (both fp32 math, y rounded once to bf16:
    1-2 ulps apart), and faster than that backend's copy + in-place update (the reason the default
    order puts triton first for ssd_step)."""
    import triton.testing

    _needs_mamba()
    args = _step_inputs(**NEMOTRON_DECODE, D=True, z=True, dtype=torch.bfloat16, device="cuda")
    inputs = [args[k] for k in STEP_NAMES]
    ours, theirs = step(*inputs, "triton"), step(*inputs, "mamba_ssm")
    errors = {"y": _close("y", ours[0], theirs[0], 2e-2), "state": _close("new state", ours[1], theirs[1], 1e-5)}
    ms = {b: triton.testing.do_bench(lambda b=b: step(*inputs, b)) for b in ("triton", "mamba_ssm")}
    print({k: f"{v:.2e}" for k, v in errors.items()}, {b: f"{t * 1e3:.1f} us" for b, t in ms.items()})
    assert ms["triton"] <= ms["mamba_ssm"], f"triton {ms['triton']:.4f} ms > mamba_ssm {ms['mamba_ssm']:.4f} ms"
