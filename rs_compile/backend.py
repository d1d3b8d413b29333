"""The ``realitystone`` torch.compile backend: rewrite passes, then Inductor.

``torch.compile(model, backend="realitystone")`` finds :data:`realitystone` through the
``torch_dynamo_backends`` entry point. Dynamo guards on the backend's identity, so backends are
built once per set of options (:func:`backend` caches them) rather than per call.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from rs_compile.config import CompileConfig, EncodingConfig, split_options
from rs_compile.report import Report, readable_graph

log = logging.getLogger("rs_compile")


def compile_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    encoding: EncodingConfig,
    compile_config: CompileConfig,
    report: Report,
    record_graphs: bool = False,
    mode: str | None = None,
) -> Callable:
    """Rewrite one dynamo graph and compile it with Inductor.

    Compressed weights become trailing inputs of the rewritten graph; the returned callable
    appends them, so the codes live once in memory and Inductor treats them as ordinary inputs.
    Before each call it checks the version counters and storages of the parameters the codes
    were encoded from, and re-encodes any that changed (rs_compile.passes.graph.SourceGuard).
    """
    from torch._inductor.compile_fx import compile_fx

    # Imported here, not at module level: `import rs_compile` must stay cheap (Inductor, sympy).
    from rs_compile.lowering import install_lowerings
    from rs_compile.lowering.cache import inductor_config_patches
    from rs_compile.passes.attention import rewrite_attention
    from rs_compile.passes.experts import compress_grouped_experts, report_dense_experts
    from rs_compile.passes.graph import GraphRewrite
    from rs_compile.passes.leftovers import report_dense_weights
    from rs_compile.passes.linear import FROZEN_REASON, compress_linears
    from rs_compile.passes.qkv import fuse_qkv_projections

    install_lowerings()
    rw = GraphRewrite(gm, example_inputs)
    local = Report()
    configs = (encoding, compile_config)  # every pass takes (rw, encoding, compile_config, report)
    rewrite_attention(rw, *configs, local)
    fuse_qkv_projections(rw, *configs, local)  # before compress_linears, which takes the rest
    compress_linears(rw, *configs, local)
    compress_grouped_experts(rw, *configs, local)  # MoE experts reached through grouped_mm
    report_dense_weights(rw, *configs, local)  # what stays dense with no entry yet (fused kernels)
    report_dense_experts(rw, local)  # and the expert tensors left dense
    new_gm = rw.finish()
    if record_graphs:
        local.graphs_before.append(readable_graph(gm))
        local.graphs_after.append(readable_graph(new_gm))
    log.info("rewrote %d linear(s), %d attention(s), skipped %d in graph of %d nodes",
             len(local.linear_rewrites), len(local.attention_rewrites), len(local.skipped),
             len(gm.graph.nodes))
    for s in local.skipped:
        log.debug("skipped %s: %s", s.module, s.reason)
    trainable = sum(s.reason == FROZEN_REASON for s in local.skipped)
    if trainable:  # the common surprise: an eval-mode model called without torch.no_grad()
        warnings.warn(f"rs_compile: {trainable} linear(s) kept dense: {FROZEN_REASON}", stacklevel=2)
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": "rs_compile_rewritten_graph", "encoding": "string"},
        payload_fn=lambda: readable_graph(new_gm),
    )
    report.extend(local)

    patches = inductor_config_patches()
    if mode:
        from torch._inductor import list_mode_options

        patches.update(list_mode_options(mode))
    extras = rw.extra_inputs
    compiled = compile_fx(new_gm, [*example_inputs, *_static_fakes(example_inputs, extras)],
                          config_patches=patches)
    if not extras:
        return compiled
    guard = rw.guard()  # codes follow edits of the weights they were encoded from
    if guard is None:
        def run(*args):
            return compiled(*args, *extras)
    else:
        def run(*args):
            guard.check(args)
            return compiled(*args, *extras)

    return run


def _static_fakes(example_inputs, extras):
    """Fake copies of the compressed tensors with static shapes in dynamo's fake mode.

    Handed over as real tensors, they would be fakeified with fresh symbolic sizes that no
    dynamo source backs (guards on them crash, and the kernels lose their constant sizes).
    """
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    if fake_mode is None:
        return extras
    return [fake_mode.from_tensor(t, static_shapes=True) for t in extras]


class RealityStoneBackend:
    """A dynamo backend with fixed defaults; ``options={...}`` from torch.compile override them."""

    def __init__(self, encoding: EncodingConfig | None = None,
                 compile_config: CompileConfig | None = None, record_graphs: bool = False):
        self.encoding, self.compile_config = split_options(None, encoding, compile_config)
        self.record_graphs = record_graphs
        self.report = Report()

    def __call__(self, gm: fx.GraphModule, example_inputs, options: dict | None = None,
                 mode: str | None = None):
        encoding, compile_config = split_options(options, self.encoding, self.compile_config)
        return compile_graph(gm, example_inputs, encoding, compile_config, self.report,
                             self.record_graphs, mode)


realitystone = RealityStoneBackend()


@functools.lru_cache(maxsize=None)
def _cached_backend(encoding: EncodingConfig, compile_config: CompileConfig) -> RealityStoneBackend:
    return RealityStoneBackend(encoding, compile_config)


def backend(**options: Any) -> RealityStoneBackend:
    """``torch.compile(model, backend=rs_compile.backend(bits=8))``: the options of both
    EncodingConfig and CompileConfig, as keywords; same options, same object."""
    return _cached_backend(*split_options(options))
