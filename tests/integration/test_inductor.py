"""What Inductor makes of the rewritten graph: fused code, cache behaviour, golden graphs."""

import copy
import uuid
from unittest import mock

import expecttest
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass

import rs_compile
from rs_compile.generation import compile_for_generation
from rs_compile.lowering.cache import SourceKeyedPass
from rs_compile.models import configs



def _compile_once(model, x, backend="realitystone"):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend=backend)(x)


def assert_keyed_on_the_sources(compile_and_run):
    """``compile_and_run()`` compiles afresh: a second call is served by the FX graph cache, a call
    with edited rs_compile sources is not (neither by the AOT autograd cache); outputs agree."""
    with torch._inductor.config.patch(fx_graph_cache=True):
        first = compile_and_run()
        counters.clear()
        second = compile_and_run()
        assert counters["inductor"]["fxgraph_cache_hit"] >= 1
        assert counters["inductor"]["fxgraph_cache_miss"] == 0
        counters.clear()
        edited = f"edited-sources-{uuid.uuid4()}"  # never seen by the on-disk cache before
        with mock.patch.object(SourceKeyedPass, "uuid", lambda self: edited):
            third = compile_and_run()
        assert counters["inductor"]["fxgraph_cache_miss"] >= 1
        assert counters["inductor"]["fxgraph_cache_hit"] == 0
        assert counters["aot_autograd"]["autograd_cache_hit"] == 0
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, third, rtol=0, atol=0)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)).eval()


@pytest.mark.parametrize("route", ["backend", "backend on converted", "inductor on converted"])
def test_second_compile_hits_the_cache_and_a_source_change_misses_it(route):
    model = rs_compile.convert(_mlp()) if route.endswith("converted") else _mlp()
    backend = "inductor" if route.startswith("inductor") else "realitystone"
    x = torch.randn(3, 64)
    assert_keyed_on_the_sources(lambda: _compile_once(model, x, backend))


def test_compile_for_generation_is_keyed_on_the_sources():
    model = rs_compile.convert(configs.gpt2("tiny"))
    prompt = torch.randint(0, 1024, (1, 6), generator=torch.Generator().manual_seed(0))

    def generate():
        torch._dynamo.reset()
        compiled = compile_for_generation(copy.deepcopy(model))
        with torch.inference_mode():
            return compiled.generate(prompt, max_new_tokens=3, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True).logits[-1]

    assert_keyed_on_the_sources(generate)


def test_compile_for_generation_without_module_guards_still_checks_weight_shapes():
    """Module guards are skipped by default (rs_compile.generation): a weight replaced by one of
    another shape must raise, not be misread; one of the same shape is read afresh."""
    model = rs_compile.convert(configs.gpt2("tiny"))
    prompt = torch.randint(0, 1024, (1, 6), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    compiled = compile_for_generation(copy.deepcopy(model))
    eager = copy.deepcopy(model)

    def logits(m):
        with torch.inference_mode():
            return m.generate(prompt, max_new_tokens=2, do_sample=False, output_logits=True,
                              return_dict_in_generate=True).logits[-1]

    torch.testing.assert_close(logits(compiled), logits(eager), rtol=1e-4, atol=1e-4)
    for m in (compiled, eager):  # same shape, new values: both must see them
        m.transformer.h[0].mlp.c_fc.row_scale.mul_(2)
    torch.testing.assert_close(logits(compiled), logits(eager), rtol=1e-4, atol=1e-4)
    layer = compiled.transformer.h[0].mlp.c_fc
    layer.codes = layer.codes[:-1].clone()  # a buffer: one row short
    with pytest.raises(AssertionError, match="size"):
        logits(compiled)


class CountingPass(CustomGraphPass):
    """A user's own post-grad pass."""

    def __init__(self):
        self.calls = 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return "counting-pass"


def test_the_users_post_grad_pass_runs_and_stays_in_the_cache_key(monkeypatch):
    user = CountingPass()
    monkeypatch.setattr(torch._inductor.config, "post_grad_custom_post_pass", user)
    model, x = _mlp(), torch.randn(3, 64)
    assert_keyed_on_the_sources(lambda: _compile_once(model, x))
    with torch._inductor.config.patch(fx_graph_cache=False):
        _compile_once(model, x)
    assert user.calls >= 1
    counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=True), \
            mock.patch.object(CountingPass, "uuid", lambda self: f"edited-user-pass-{uuid.uuid4()}"):
        _compile_once(model, x)
    assert counters["inductor"]["fxgraph_cache_miss"] == 1


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class GoldenGraphs(expecttest.TestCase):
    def test_rewritten_graph_before_and_after(self):
        torch._dynamo.reset()
        torch.manual_seed(0)
        report = rs_compile.inspect(TwoLayer().eval(), torch.randn(2, 32))
        self.assertExpectedInline(report.graph_before, """\
%l_self_modules_up_parameters_weight_ : torch.nn.parameter.Parameter [num_users=1] = placeholder[target=L_self_modules_up_parameters_weight_]
%l_self_modules_up_parameters_bias_ : torch.nn.parameter.Parameter [num_users=1] = placeholder[target=L_self_modules_up_parameters_bias_]
%l_x_ : torch.Tensor [num_users=1] = placeholder[target=L_x_]
%l_self_modules_down_parameters_weight_ : torch.nn.parameter.Parameter [num_users=1] = placeholder[target=L_self_modules_down_parameters_weight_]
%linear : [num_users=1] = call_function[target=torch._C._nn.linear](args = (%l_x_, %l_self_modules_up_parameters_weight_, %l_self_modules_up_parameters_bias_), kwargs = {})  # up
%relu : [num_users=1] = call_function[target=torch.relu](args = (%linear,), kwargs = {})
%linear_1 : [num_users=1] = call_function[target=torch._C._nn.linear](args = (%relu, %l_self_modules_down_parameters_weight_, None), kwargs = {})  # down
return (linear_1,)""")
        self.assertExpectedInline(report.graph_after, """\
%l_self_modules_up_parameters_weight_ : torch.nn.parameter.Parameter [num_users=0] = placeholder[target=L_self_modules_up_parameters_weight_]
%l_self_modules_up_parameters_bias_ : torch.nn.parameter.Parameter [num_users=1] = placeholder[target=L_self_modules_up_parameters_bias_]
%l_x_ : torch.Tensor [num_users=1] = placeholder[target=L_x_]
%l_self_modules_down_parameters_weight_ : torch.nn.parameter.Parameter [num_users=0] = placeholder[target=L_self_modules_down_parameters_weight_]
%rs_up_codes : [num_users=1] = placeholder[target=rs_up_codes]
%rs_up_groups : [num_users=1] = placeholder[target=rs_up_groups]
%rs_up_row_scale : [num_users=1] = placeholder[target=rs_up_row_scale]
%rs_down_codes : [num_users=1] = placeholder[target=rs_down_codes]
%rs_down_groups : [num_users=1] = placeholder[target=rs_down_groups]
%rs_down_row_scale : [num_users=1] = placeholder[target=rs_down_row_scale]
%linear_default : [num_users=1] = call_function[target=torch.ops.rs.linear.default](args = (%l_x_, %rs_up_codes, %rs_up_groups, %rs_up_row_scale, %l_self_modules_up_parameters_bias_, 4, 32, 32), kwargs = {})  # up
%relu : [num_users=1] = call_function[target=torch.relu](args = (%linear_default,), kwargs = {})
%linear_default_1 : [num_users=1] = call_function[target=torch.ops.rs.linear.default](args = (%relu, %rs_down_codes, %rs_down_groups, %rs_down_row_scale, None, 4, 32, 64), kwargs = {})  # down
return (linear_default_1,)""")
