"""Calibration: run a model on sample inputs and encode each linear against its own inputs.

Layers are encoded in the order the model calls them, one group at a time (the layers that read
one tensor, e.g. q/k/v): a pass over the calibration items collects the group's input second
moments ``X^T X`` with forward pre-hooks, the group is encoded, and from then on its outputs are
replaced by the encoded layer's. Later layers are therefore calibrated on the inputs the
compressed model will actually give them (GPTQ's sequential mode), and only one group's
``in x in`` statistics exist at a time (a 125M GPT-2 would need ~1.1 GB to hold all at once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from rs_compile.codec.calibrate import gptq_encode
from rs_compile.codec.encode import EncodedWeight, encode
from rs_compile.modules import CompressedLinear

Item = tuple | Mapping


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


def run_items(model: nn.Module, items: Sequence[Item]) -> None:
    for item in items:
        if isinstance(item, Mapping):
            model(**item)
        else:
            model(*item)


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
        """``X^T X / rows``: the inputs' second-moment matrix."""
        return (self.sum / self.rows).cpu()


def call_groups(model: nn.Module, modules: Mapping[str, nn.Module], item: Item) -> list[list[str]]:
    """Names of ``modules`` in first-call order for one item, grouped by shared input tensor."""
    calls: list[tuple[str, torch.Tensor]] = []
    names = {id(m): n for n, m in modules.items()}

    def record(module: nn.Module, args: tuple) -> None:
        calls.append((names[id(module)], args[0]))

    handles = [m.register_forward_pre_hook(record) for m in modules.values()]
    try:
        run_items(model, [item])
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
    return groups


def calibrated_encodings(
    model: nn.Module,
    layers: Mapping[str, tuple[nn.Module, torch.Tensor, torch.Tensor | None]],
    items: Sequence[Item],
    config,
    progress: bool = False,
) -> dict[str, EncodedWeight]:
    """Encode ``layers`` (name -> (module, weight [out, in], bias)) against calibration inputs.

    With ``config.gptq`` each layer is GPTQ-encoded with its inputs' second moments; otherwise
    the calibration-free search runs with each weight's error weighted by its input's mean square.
    The model is left as it was (hooks removed) whether or not encoding succeeds.
    """
    modules = {name: module for name, (module, _, _) in layers.items()}
    encoded: dict[str, EncodedWeight] = {}
    handles = []
    with inference_mode(model):
        try:
            groups = call_groups(model, modules, items[0])
            for group in tqdm(groups, desc="rs_compile calibrate", disable=not progress):
                moments = {name: SecondMoments() for name in group}
                hooks = [modules[n].register_forward_pre_hook(moments[n]) for n in group]
                try:
                    run_items(model, items)
                finally:
                    for h in hooks:
                        h.remove()
                for name in group:
                    _, weight, bias = layers[name]
                    encoded[name] = _encode(weight, moments[name].mean(), config)
                    substitute = CompressedLinear(encoded[name], bias).to(weight.device)
                    handles.append(modules[name].register_forward_hook(
                        lambda module, args, out, sub=substitute: sub(args[0])))
        finally:
            for h in handles:
                h.remove()
    return encoded


def _encode(weight: torch.Tensor, moments: torch.Tensor, config) -> EncodedWeight:
    if config.gptq:
        return gptq_encode(weight.detach(), moments, config.bits, config.group_size,
                           config.curvatures, config.curv_step, config.gptq_damp)
    return encode(weight.detach(), config.bits, config.group_size, config.curvatures,
                  config.curv_step, importance=moments.diagonal().float())
