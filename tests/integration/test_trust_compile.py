"""The compile route never answers from stale or silently frozen weights.

1. Codes are encoded from the module's parameters at compile time. An edit afterwards (in place
   under no_grad, an optimizer step, load_state_dict, ``param.data = t``, a new Parameter) must
   change the compiled output to what eager gives on the edited weights: the backend checks the
   parameters' version counters and storages at every call and re-encodes what changed.
2. Compiling for training (weights that require grad, grad mode on) must not hand the weights a
   silent ``grad=None``: such layers stay dense with the reason in the report, unless
   ``frozen_weights=True`` asks for frozen compressed weights (gradients to inputs and biases).

Reference for compiled outputs: the same model after ``rs_compile.convert``, run eagerly (the
same decoded weights; fp32 summation order differs, hence rtol/atol ~1e-4/1e-5). Reference for
gradients through compressed layers: float64 autograd through the decoded weights.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rs_compile
from rs_compile.passes.graph import SourceGuard


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # new models of one class reuse forward's code: stay below recompile_limit
    yield
    torch._dynamo.reset()


class MLP(nn.Module):
    def __init__(self, d=64, h=96, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class QKV(nn.Module):
    """Three projections of one input in one module: fused into one rs::linear."""

    def __init__(self, d=64):
        super().__init__()
        torch.manual_seed(1)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d) for _ in range(3))

    def forward(self, x):
        return self.q_proj(x) * self.k_proj(x).sigmoid() + self.v_proj(x)


class Wrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.attn = inner

    def forward(self, x):
        return self.attn(x)


def make_backend(**options):
    backend = rs_compile.backend(attention=False, **options)
    backend.report = rs_compile.Report()
    return backend


def eager_reference(model, x):
    """What the compiled model must give: the converted copy's eager output."""
    with torch.no_grad():
        return rs_compile.convert(copy.deepcopy(model))(x)


def count_rebuilds(monkeypatch) -> list:
    calls = []
    original = SourceGuard._rebuild

    def counting(self, *args):
        calls.append(args[0])
        return original(self, *args)

    monkeypatch.setattr(SourceGuard, "_rebuild", counting)
    return calls


# ---------------------------------------------------------------- 1. edits after compiling

def test_weight_edits_after_compile_reach_the_compiled_output(monkeypatch):
    model, x = MLP().eval(), torch.randn(5, 64)
    backend = make_backend()
    compiled = torch.compile(model, backend=backend)
    rebuilds = count_rebuilds(monkeypatch)
    with torch.no_grad():
        before = compiled(x)
        assert len(backend.report.linear_rewrites) == 2
        torch.testing.assert_close(compiled(x), before, rtol=0, atol=0)
    assert rebuilds == []  # nothing changed: nothing re-encoded

    def edit_no_grad(m):
        with torch.no_grad():
            m.fc1.weight.mul_(-1)

    def edit_optimizer_step(m):  # train eagerly, evaluate with the compiled model
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        (m(torch.randn(8, 64)) ** 2).sum().backward()
        opt.step()
        opt.zero_grad()

    def edit_load_state_dict(m):
        m.load_state_dict(MLP(seed=7).state_dict())

    def edit_data_assignment(m):
        m.fc2.weight.data = torch.randn_like(m.fc2.weight)

    def edit_new_parameter(m):
        m.fc1.weight = nn.Parameter(torch.randn_like(m.fc1.weight))

    last = before
    for edit in (edit_no_grad, edit_optimizer_step, edit_load_state_dict, edit_data_assignment,
                 edit_new_parameter):
        edit(model)
        with torch.no_grad():
            out = compiled(x)
        ref = eager_reference(model, x)
        assert (out - last).norm() > 0.1 * last.norm(), f"{edit.__name__}: output did not change"
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{edit.__name__}: {m}")
        last = out
    assert rebuilds, "edits were picked up by recompiling, not by the guard"


def test_edits_of_fused_qkv_weights_and_biases_are_picked_up():
    model, x = Wrapper(QKV()).eval(), torch.randn(3, 64)
    backend = make_backend()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        before = compiled(x)
        assert backend.report.fused_qkv == 1
        model.attn.q_proj.weight.mul_(-1)
        out = compiled(x)
    torch.testing.assert_close(out, eager_reference(model, x), rtol=1e-4, atol=1e-5)
    assert (out - before).norm() > 0.1 * before.norm()
    with torch.no_grad():
        model.attn.k_proj.bias.add_(3.0)  # the fused op's bias is a concatenated copy
        out = compiled(x)
    torch.testing.assert_close(out, eager_reference(model, x), rtol=1e-4, atol=1e-5)


def test_edit_through_dot_data_is_re_encoded_after_compiler_reset():
    """``w.data.mul_()`` bumps no version counter: only a recompile sees it, and the encode cache
    (keyed on the parameter object) must not hand the recompile the old codes."""
    model, x = MLP().eval(), torch.randn(4, 64)
    compiled = torch.compile(model, backend=make_backend())
    with torch.no_grad():
        compiled(x)
    model.fc1.weight.data.mul_(-1)
    torch.compiler.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=make_backend())(x)
    torch.testing.assert_close(out, eager_reference(model, x), rtol=1e-4, atol=1e-5)


def test_guard_check_is_cheap():
    """The per-call check over 100 parameters costs well under 1% of a ~10 ms decode step."""
    import time
    from rs_compile.passes.graph import Derived

    params = [nn.Parameter(torch.randn(32, 32)) for _ in range(100)]
    derived = [Derived((i,), None, (i,), ((p._version, p.data_ptr()),)) for i, p in enumerate(params)]
    guard = SourceGuard(derived, [None] * 100)
    args = [*params, torch.randn(1, 32)]
    guard.check(args)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(200):
            guard.check(args)
        best = min(best, (time.perf_counter() - t) / 200)
    assert best < 100e-6, f"{best * 1e6:.1f} us per check"


# ---------------------------------------------------------------- 2. training

def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def test_training_compile_keeps_trainable_weights_dense_with_a_reason():
    model, x = MLP().train(), torch.randn(6, 64)
    eager = copy.deepcopy(model)
    backend = make_backend()
    g = torch.randn(6, 64)
    with pytest.warns(UserWarning, match=r"2 linear\(s\) kept dense: weight requires grad"):
        (torch.compile(model, backend=backend)(x) * g).sum().backward()
    (eager(x) * g).sum().backward()
    report = backend.report
    assert report.linear_rewrites == []
    assert {s.module for s in report.skipped} == {"fc1", "fc2"}
    assert all("requires grad" in s.reason and "frozen_weights=True" in s.reason
               for s in report.skipped)
    got, want = _grads(model), _grads(eager)
    for name in want:
        assert got[name] is not None, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def _float64_reference(model, x, g):
    """Gradients to x and the biases through the decoded weights, in float64."""
    decoded = {n: m.dequantize().double() for n, m in rs_compile.convert(copy.deepcopy(model)).named_modules()
               if isinstance(m, rs_compile.CompressedLinear)}
    x64 = x.detach().double().requires_grad_()
    b1, b2 = (model.get_submodule(n).bias.detach().double().requires_grad_() for n in ("fc1", "fc2"))
    y = F.linear(F.relu(F.linear(x64, decoded["fc1"], b1)), decoded["fc2"], b2)
    (y * g.double()).sum().backward()
    return y.detach(), x64.grad, b1.grad, b2.grad


def test_frozen_weights_compresses_and_gradients_reach_inputs_and_biases():
    model = MLP().train()
    x, g = torch.randn(6, 64, requires_grad=True), torch.randn(6, 64)
    backend = make_backend(frozen_weights=True)
    y = torch.compile(model, backend=backend)(x)
    (y * g).sum().backward()
    assert [r.module for r in backend.report.linear_rewrites] == ["fc1", "fc2"]
    ref_y, ref_x, ref_b1, ref_b2 = _float64_reference(model, x, g)
    torch.testing.assert_close(y.detach().double(), ref_y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_x, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.fc1.bias.grad.double(), ref_b1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.fc2.bias.grad.double(), ref_b2, rtol=1e-4, atol=1e-5)
    assert model.fc1.weight.grad is None and model.fc2.weight.grad is None  # frozen, as asked


def test_frozen_weights_with_trainable_biases_get_bias_gradients():
    """BitFit-style: weights frozen by the user, biases trained. The weights are compressed
    without any option, and the biases' gradients must not be dropped."""
    model = MLP().train()
    for layer in (model.fc1, model.fc2):
        layer.weight.requires_grad_(False)
    x, g = torch.randn(6, 64), torch.randn(6, 64)
    backend = make_backend()
    (torch.compile(model, backend=backend)(x) * g).sum().backward()
    assert len(backend.report.linear_rewrites) == 2 and backend.report.skipped == []
    _, _, ref_b1, ref_b2 = _float64_reference(model, x, g)
    torch.testing.assert_close(model.fc1.bias.grad.double(), ref_b1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.fc2.bias.grad.double(), ref_b2, rtol=1e-4, atol=1e-5)


def test_grad_enabled_inside_forward_counts_as_training():
    class Inner(MLP):
        def forward(self, x):
            with torch.enable_grad():
                return super().forward(x)

    model, x = Inner().train(), torch.randn(2, 64)
    backend = make_backend()
    with torch.no_grad():
        y = torch.compile(model, backend=backend)(x)
    assert backend.report.linear_rewrites == [] and len(backend.report.skipped) == 2
    y.sum().backward()
    assert model.fc1.weight.grad is not None


def test_no_grad_compile_of_a_training_model_compresses():
    model, x = MLP().train(), torch.randn(2, 64)
    backend = make_backend()
    with torch.no_grad():
        torch.compile(model, backend=backend)(x)
    assert len(backend.report.linear_rewrites) == 2 and backend.report.skipped == []


def test_convert_freezes_weights_and_biases_as_buffers():
    """convert is an explicit request: layers are compressed even with requires_grad weights,
    and they leave model.parameters() (codes and bias are buffers); gradients reach inputs."""
    model = nn.Sequential(MLP(), nn.LayerNorm(64))
    rs_compile.convert(model)
    assert [n for n, _ in model.named_parameters()] == ["1.weight", "1.bias"]
    x = torch.randn(3, 64, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
