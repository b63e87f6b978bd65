"""Policy, pipeline ordering, report and the end-to-end optimize()/torch.compile paths."""
import logging

import pytest
import torch
from torch import nn

import dsgraph
from dsgraph.pipeline import Pass, PipelineError, order_passes
from dsgraph.policy import Policy, resolve_policy


class TinyAttention(nn.Module):
    """x [B, S, D] -> [B, S, D]: GQA (2 kv heads for 4 query heads of D/4), causal, fp32 softmax."""

    def __init__(self, dim=32):
        super().__init__()
        self.q, self.kv, self.o = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, S, D = x.shape
        q = self.q(x).view(B, S, 4, D // 4).transpose(1, 2)
        k, v = self.kv(x).view(B, S, 2, 2, D // 4).permute(2, 0, 3, 1, 4)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        scores = torch.einsum("bhsd,bhtd->bhst", q, k) / (D // 4) ** 0.5
        scores = scores + torch.full((S, S), float("-inf"), device=x.device).triu(1)
        return self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, D))


def _named(name, needs=(), provides=()):
    return type(name, (Pass,), {"name": name, "needs": needs, "provides": provides,
                                "run": lambda self, gm, ctx: None})()


def test_pipeline_orders_by_needs_and_provides():
    a, b, c = _named("a", needs=("x",)), _named("b", provides=("x",), needs=("y",)), _named("c", provides=("y",))
    assert [p.name for p in order_passes([a, b, c])] == ["c", "b", "a"]


def test_pipeline_cycle_is_a_clear_error():
    with pytest.raises(PipelineError, match="cycle: a -> b -> a|cycle: b -> a -> b"):
        order_passes([_named("a", needs=("x",), provides=("y",)), _named("b", needs=("y",), provides=("x",))])


def test_policy_presets_env_and_errors(monkeypatch):
    assert Policy.preset("auto").backends_for("attention") == ("sdpa", "tilelang", "triton", "mamba_ssm", "flex", "torch")
    assert Policy.preset("auto").backends_for("hadamard") == ("tilelang", "sdpa", "mamba_ssm", "triton", "flex", "torch")
    forced = Policy.parse("triton;strict;attention=triton,torch;residual=eager")
    assert forced.strict and forced.residual == "eager" and forced.backends_for("attention") == ("triton", "torch")
    with pytest.raises(ValueError, match="accepted presets: auto, autotune, reference, triton, tilelang"):
        Policy.preset("fast")
    with pytest.raises(ValueError, match="unknown backend 'cuda'; accepted backends"):
        Policy(order=("cuda",))
    assert Policy.parse("auto;cudagraphs").cudagraphs and not Policy.preset("auto").cudagraphs
    with pytest.raises(ValueError, match="cudagraphs needs residual='inductor'"):
        Policy.parse("auto;cudagraphs;residual=eager")
    monkeypatch.setenv("DSGRAPH_POLICY", "reference")
    assert resolve_policy("triton").name == "reference"  # the environment overrides the argument


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="optimize\\(\\) takes an nn.Module or a function"):
        dsgraph.optimize(3)
    with pytest.raises(TypeError, match="verify must be True or False"):
        dsgraph.optimize(TinyAttention(), verify="yes")
    with pytest.raises(TypeError, match="explain\\(\\) takes what dsgraph.optimize\\(\\) returned"):
        dsgraph.explain(TinyAttention())
    with pytest.raises(Exception, match="unknown dsgraph option"):
        torch.compile(lambda x: x + 1, backend="dsgraph", options={"polcy": "auto"})(torch.ones(2))


def test_optimize_module_trains_like_eager_through_inductor(monkeypatch):
    """The one end-to-end Inductor compile of the suite: forward and backward of a module. AOTAutograd
    sees the parameters as static inputs, as Dynamo marked them (CUDA graphs then do not copy them)."""
    import torch._functorch.aot_autograd as aot
    static = []

    def metadata(mod, *args):
        sources, indices = original(mod, *args)
        static.append(list(indices))
        return sources, indices
    original = aot._try_get_metadata_from_dynamo
    monkeypatch.setattr(aot, "_try_get_metadata_from_dynamo", metadata)
    torch.manual_seed(0)
    model = TinyAttention()
    opt = dsgraph.optimize(model, verify=True)
    assert isinstance(opt, nn.Module) and opt is not model
    assert list(opt.state_dict()) == list(model.state_dict())
    assert all(a is b for a, b in zip(opt.parameters(), model.parameters()))
    x = torch.randn(2, 6, 32)
    out = opt(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = model(x)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want)
    report = dsgraph.explain(opt)
    assert report.count("attention") == 1 and report.count("masks") == 1, report
    site = [r for r in report.rewrites if r.op == "attention"][0]
    assert site.verified and "GQA x2" in site.detail and "band" in site.detail
    assert "test_core.py" in site.location
    assert [len(indices) for indices in static] == [len(list(model.parameters()))], static


def test_optimize_compiles_torch_nn_containers():
    """Dynamo skips the frames of torch.nn's own modules (Sequential.forward): optimize traces them
    from a frame of its own, as torch.compile(module) does, instead of silently running eager. A
    forward that is not a method (functools.partial, as accelerate's hooks set) is compiled as before."""
    import functools
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32))
    opt = dsgraph.optimize(model, policy="auto;residual=eager")
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(opt(x), model(x))
    assert dsgraph.explain(opt).graphs == 1
    wrapped = TinyAttention()
    wrapped.forward = functools.partial(type(wrapped).forward, wrapped)
    opt = dsgraph.optimize(wrapped, policy="auto;residual=eager")
    torch.testing.assert_close(opt(x), wrapped(x))
    assert dsgraph.explain(opt).count("attention") == 1


def test_graph_tensor_constants_compile_with_static_inputs():
    """A tensor built in forward is a constant of the traced graph (a buffer AOTAutograd looks up by
    name alongside Dynamo's parameter sources)."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) * torch.tensor([1.0, 2.0, 3.0, 4.0])
    model = Scaled()
    x = torch.randn(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(dsgraph.optimize(model)(x), model(x))


def test_compile_backend_with_triton_kernels(caplog):
    """torch.compile(backend="dsgraph") with the Triton kernels (interpreter on CPU), eager residual."""
    model = TinyAttention()
    report = dsgraph.Report()
    compiled = torch.compile(model, backend="dsgraph",
                             options={"policy": "triton;residual=eager", "report": report})
    x = torch.randn(1, 5, 32, requires_grad=True)
    with caplog.at_level(logging.INFO, logger="dsgraph"):
        out = compiled(x)
    assert any("rewrote" in r.message for r in caplog.records)
    out.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    expected = model(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, x.grad)
    (site,) = [r for r in report.rewrites if r.op == "attention"]
    assert site.backend == "triton", report


@pytest.mark.gpu
def test_cudagraphs_policy_replays_the_rewritten_graph():
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = TinyAttention(dim=256).cuda()
    opt = dsgraph.optimize(model, policy="triton;strict;cudagraphs")
    counters.clear()
    with torch.no_grad():
        for _ in range(3):  # warm-up, record, replay
            x = torch.randn(2, 300, 256, device="cuda")
            torch.testing.assert_close(opt(x).clone(), model(x))
    assert dsgraph.explain(opt).count("attention") == 1
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    manager = torch._inductor.cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None and list(manager.get_roots()), "no CUDA graph was recorded"


@pytest.mark.gpu
def test_optimize_on_gpu_runs_the_triton_kernels_forward_and_backward():
    # fp32 (the kernel's ieee-precision dots) so that assert_close's fp32 defaults apply
    torch.manual_seed(0)
    model = TinyAttention(dim=256).cuda()
    opt = dsgraph.optimize(model, policy="triton;strict")  # "auto" would pick SDPA for this site
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    out = opt(x)
    out.square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    expected = model(x)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, x.grad)
    (site,) = [r for r in dsgraph.explain(opt).rewrites if r.op == "attention"]
    assert site.backend == "triton", dsgraph.explain(opt)


def test_in_place_ops_keep_their_dtype_when_captured():
    """``bf16 += fp32`` stays bf16 in place; its functional form would promote to fp32."""
    from dsgraph.testing import rewrite

    def fn(x, mask):
        y = x * 2
        y += mask
        return y

    x, mask = torch.randn(4, 4, dtype=torch.bfloat16), torch.randn(4, 4)
    gm, _ = rewrite(fn, (x, mask))
    torch.testing.assert_close(gm(x, mask), fn(x, mask), rtol=0, atol=0)
