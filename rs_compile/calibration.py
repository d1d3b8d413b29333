"""Calibration: run a model on sample inputs and encode each linear against its own inputs.

Layers are encoded in the order the model calls them, one group at a time (the layers that read
one tensor, e.g. q/k/v): a pass over the calibration items collects the group's input second
moments ``X^T X`` with forward pre-hooks, the group is encoded, and from then on its outputs are
replaced by the encoded layer's. Later layers are therefore calibrated on the inputs the
compressed model will actually give them (GPTQ's sequential mode), and only one group's
``in x in`` statistics exist at a time (all of a 125M GPT-2's at once would take ~1.1 GB).
A pass stops as soon as the group's last layer has its input, when every layer runs once per call.

Optionally (``bit_budget``) each layer's code width is chosen first from its measured effect on
the model's output, within an all-in bits/weight budget.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rs_compile.codec.calibrate import gptq_encode
from rs_compile.codec.encode import EncodedWeight, encode
from rs_compile.codec.format import Format
from rs_compile.config import EncodingConfig

Item = tuple | Mapping
ALLOCATION_BITS = (3, 4, 5, 8)  # the code widths bit allocation chooses from


class Layer(NamedTuple):
    module: nn.Module
    weight: torch.Tensor  # [out, in] (a transposed view for transformers' Conv1D)
    bias: torch.Tensor | None


def check_items(calibration: Iterable[Any]) -> list[Item]:
    """The calibration items as a list; ValueError naming the first item of the wrong form."""
    if isinstance(calibration, (torch.Tensor, Mapping, str)):
        raise ValueError(
            f"calibration must be a list of items, got a single {type(calibration).__name__}; "
            "wrap it: calibration=[(input_ids,)] or calibration=[{'input_ids': ids}]"
        )
    items = list(calibration)
    if not items:
        raise ValueError("calibration is empty; pass at least one item, or calibration=None for "
                         "calibration-free encoding")
    for i, item in enumerate(items):
        if not isinstance(item, (tuple, Mapping)):
            raise ValueError(
                f"calibration item {i} is a {type(item).__name__}; each item must be a tuple of "
                "positional arguments or a dict of keyword arguments for model(...), e.g. "
                "(input_ids,) or {'input_ids': ids, 'attention_mask': mask}"
            )
    return items


def call_model(model: nn.Module, item: Item) -> Any:
    return model(**item) if isinstance(item, Mapping) else model(*item)


class _StopForward(Exception):
    """Raised by a hook once the statistics it waits for are collected."""


def run_items(model: nn.Module, items: Sequence[Item]) -> None:
    for item in items:
        try:
            call_model(model, item)
        except _StopForward:
            pass


@contextlib.contextmanager
def inference_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd while calibrating; every module's mode is restored."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes.items():
            m.training = training


class SecondMoments:
    """Forward pre-hook accumulating ``X^T X`` (float64) over every row of a linear's input."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.rows = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1]).double()
        gram = x.T @ x
        self.sum = gram if self.sum is None else self.sum + gram
        self.rows += x.shape[0]

    def mean(self) -> torch.Tensor:
        """``X^T X / rows``: the inputs' second-moment matrix, on the CPU."""
        return (self.sum / self.rows).cpu()


def call_groups(model: nn.Module, modules: Mapping[str, nn.Module], item: Item) -> tuple[list[list[str]], bool]:
    """Names of ``modules`` in first-call order for one item, grouped by shared input tensor, and
    whether every one of them is called exactly once (so a pass may stop after a group)."""
    calls: list[tuple[str, torch.Tensor]] = []
    names = {id(m): n for n, m in modules.items()}

    def record(module: nn.Module, args: tuple) -> None:
        calls.append((names[id(module)], args[0]))

    handles = [m.register_forward_pre_hook(record) for m in modules.values()]
    try:
        call_model(model, item)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    last_input = None
    for name, x in calls:
        if name in seen:
            continue
        seen.add(name)
        if groups and x is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = x
    missing = sorted(set(modules) - seen)
    if missing:
        raise ValueError(
            f"the calibration items never reach layers {missing}, so there is nothing to calibrate "
            "them on; pass items that exercise them, or convert without calibration"
        )
    return groups, len(calls) == len(seen)


def output_distance(reference: Any, output: Any) -> float:
    """How far a model output is from the reference output of the same item.

    Outputs with ``logits`` (language models): mean KL(reference || output) of the softmax over
    the last dimension. Otherwise: squared error of the first output tensor (``last_hidden_state``
    of an encoder, or a bare tensor) relative to the reference's squared norm.
    """
    if getattr(reference, "logits", None) is not None:
        log_p = torch.log_softmax(reference.logits.double(), -1)
        log_q = torch.log_softmax(output.logits.double(), -1)
        return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    ref, out = (x if isinstance(x, torch.Tensor) else x[0] for x in (reference, output))
    ref, out = ref.double(), out.double()
    return float((out - ref).square().sum() / ref.square().sum().clamp_min(1e-300))


def _replace_output(layer: Layer, w_hat: torch.Tensor):
    """Forward hook making ``layer`` compute with ``w_hat`` (what CompressedLinear computes)."""
    return layer.module.register_forward_hook(
        lambda module, args, out: F.linear(args[0], w_hat.to(args[0].dtype),
                                           None if layer.bias is None else layer.bias.to(args[0].dtype)))


def layer_sensitivities(
    model: nn.Module, layers: Mapping[str, Layer], items: Sequence[Item], encoding: EncodingConfig,
    progress: bool = False,
) -> dict[tuple[str, int], float]:
    """``{(layer, bits): mean output distance over the items}`` with only that layer encoded
    (calibration-free) at each width of ALLOCATION_BITS."""
    result = {}
    with inference_mode(model):
        references = [call_model(model, item) for item in items]
        for name, layer in tqdm(layers.items(), desc="rs_compile sensitivity", disable=not progress):
            for bits in ALLOCATION_BITS:
                w_hat = encode(layer.weight.detach(), Format(bits, encoding.group_size),
                               curvatures=encoding.curvatures).dequantize().to(layer.weight.device)
                handle = _replace_output(layer, w_hat)
                try:
                    result[name, bits] = sum(output_distance(ref, call_model(model, item))
                                             for ref, item in zip(references, items)) / len(items)
                finally:
                    handle.remove()
    return result


def allocate_bits(
    layers: Mapping[str, Layer], sensitivity: Mapping[tuple[str, int], float],
    encoding: EncodingConfig,
) -> dict[str, int]:
    """Per-layer code widths minimising the summed output distances of :func:`layer_sensitivities`
    with all-in bits/weight (codes, scales, curvatures) at most ``encoding.bit_budget``.

    The sum is a proxy (single-layer distances do not add up exactly; they rank the layers), and
    its constrained minimum is found by bisection on the Lagrange multiplier of the size, which
    can leave a little of the budget unused.
    """
    cost = {(name, b): 8 * Format(b, encoding.group_size).nbytes(*layer.weight.shape)
            for name, layer in layers.items() for b in ALLOCATION_BITS}
    weights = sum(layer.weight.numel() for layer in layers.values())
    budget = encoding.bit_budget * weights

    def choose(lam: float) -> dict[str, int]:
        return {n: min(ALLOCATION_BITS, key=lambda b: sensitivity[n, b] + lam * cost[n, b])
                for n in layers}

    def size(choice: dict[str, int]) -> float:
        return sum(cost[n, b] for n, b in choice.items())

    smallest = size({n: ALLOCATION_BITS[0] for n in layers})
    if smallest > budget:
        raise ValueError(
            f"bit_budget={encoding.bit_budget} is below the smallest encoding of these layers "
            f"({smallest / weights:.3f} bits/weight at {ALLOCATION_BITS[0]} bits with "
            f"group_size={encoding.group_size}); raise it"
        )
    lo, hi = 0.0, 1.0
    while size(choose(hi)) > budget:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if size(choose(mid)) > budget else (lo, mid)
    return choose(hi)


def calibrated_encodings(
    model: nn.Module, layers: Mapping[str, Layer], items: Sequence[Item], encoding: EncodingConfig,
    progress: bool = False,
) -> dict[str, EncodedWeight]:
    """Encode ``layers`` sequentially against their calibration inputs (see the module doc).

    With ``encoding.bit_budget`` each layer's width comes from :func:`allocate_bits`. With
    ``encoding.gptq`` layers are GPTQ-encoded; otherwise the calibration-free search runs with each
    weight's error weighted by its input's mean square. Hooks are removed whatever happens.
    """
    bits = {name: encoding.bits for name in layers}
    if encoding.bit_budget is not None:
        bits = allocate_bits(layers, layer_sensitivities(model, layers, items, encoding, progress),
                             encoding)

    def encode_layer(name: str, moments: torch.Tensor) -> tuple[EncodedWeight, torch.Tensor]:
        encoded = _encode(layers[name].weight, moments, bits[name], encoding)
        return encoded, encoded.dequantize()

    return sequential_reconstructions(model, layers, items, encode_layer, progress)


def sequential_reconstructions(
    model: nn.Module, layers: Mapping[str, Layer], items: Sequence[Item],
    reconstruct: Callable[[str, torch.Tensor], tuple[Any, torch.Tensor]], progress: bool = False,
) -> dict[str, Any]:
    """``{name: result}`` with ``result, w_hat = reconstruct(name, X^T X / rows)`` for ``layers``
    in call order, each group's statistics taken with the earlier layers already computing with
    their reconstructions ``w_hat [out, in]`` (the sequential mode of the module doc). Any
    quantizer taking ``X^T X`` plugs in (e.g. the GPTQ baselines of rs_compile.eval).
    Hooks are removed whatever happens."""
    results: dict[str, Any] = {}
    replaced = []
    with inference_mode(model):
        try:
            groups, called_once = call_groups(model, {n: l.module for n, l in layers.items()}, items[0])
            for group in tqdm(groups, desc="rs_compile calibrate", disable=not progress):
                moments = _collect(model, [layers[n].module for n in group], items, called_once)
                for name, moment in zip(group, moments):
                    layer = layers[name]
                    results[name], w_hat = reconstruct(name, moment)
                    replaced.append(_replace_output(layer, w_hat.to(layer.weight.device)))
        finally:
            for handle in replaced:
                handle.remove()
    return results


def _collect(model: nn.Module, modules: list[nn.Module], items: Sequence[Item],
             stop_early: bool) -> list[torch.Tensor]:
    moments = [SecondMoments() for _ in modules]
    handles = [m.register_forward_pre_hook(s) for m, s in zip(modules, moments)]
    if stop_early:
        def stop(module: nn.Module, args: tuple) -> None:
            raise _StopForward
        handles.append(modules[-1].register_forward_pre_hook(stop))
    try:
        run_items(model, items)
    finally:
        for h in handles:
            h.remove()
    return [s.mean() for s in moments]


def _encode(weight: torch.Tensor, moments: torch.Tensor, bits: int,
            encoding: EncodingConfig) -> EncodedWeight:
    fmt = Format(bits, encoding.group_size)
    if encoding.gptq:
        return gptq_encode(weight.detach(), moments, fmt, curvatures=encoding.curvatures,
                           damp=encoding.gptq_damp)
    return encode(weight.detach(), fmt, curvatures=encoding.curvatures,
                  importance=moments.diagonal().float())
