"""The compile route never answers from stale or silently frozen weights.

1. Codes are encoded from the module's parameters at compile time. An edit afterwards (in place
   under no_grad, an optimizer step, load_state_dict, ``param.data = t``, a new Parameter) must
   change the compiled output to what eager gives on the edited weights: the backend checks the
   parameters' version counters and storages at every call and re-encodes what changed.

Reference for compiled outputs: the same model after ``rs_compile.convert``, run eagerly (the
same decoded weights; fp32 summation order differs, hence rtol/atol ~1e-4/1e-5).
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
