"""The modules ``convert`` swaps in: CompressedLinear (nn.Linear, transformers' Conv1D) and
CompressedEmbedding (nn.Embedding and its subclasses)."""

from __future__ import annotations

import functools

import torch
from torch import nn

from rs_compile.codec.encode import EncodedWeight
from rs_compile.codec.format import Format, decode_weight
from rs_compile.ops.embedding import embedding
from rs_compile.lowering.cpu_kernel import fast_checks_pass, linear_cpu
from rs_compile.ops.linear import linear

PACKED = ("codes", "groups", "row_scale")  # EncodedWeight.tensors() order


class _WeightDtype:
    """Tracks the dtype the replaced layer's weight had (``weight_dtype``) through
    ``model.to(dtype)`` / ``.half()`` / ``.bfloat16()``, which cast floating-point tensors, so that
    the module computes and reads back in the model's dtype as the original layer would."""

    def _apply(self, fn, recurse=True):
        try:
            self.weight_dtype = fn(torch.empty(0, dtype=self.weight_dtype,
                                               device=self.codes.device)).dtype
        except Exception:  # noqa: BLE001  (a conversion that takes no tensor: keep the dtype)
            pass
        return super()._apply(fn, recurse)


class CompressedLinear(_WeightDtype, nn.Module):
    """y = x @ W.T + b with W held only in the codec's format (buffers), executed by rs::linear.

    Buffers: the packed ``codes``, ``groups`` and ``row_scale`` (rs_compile.codec.format), and the
    dense ``bias`` if the original layer had one. No dense weight is kept. ``act_bits=8`` rounds
    the input to int8 per group first (rs_compile.codec.activations).

    ``weight`` is a read-only property for model code that reads ``layer.weight`` itself (T5's
    ``self.wo.weight.dtype`` check, the fused fast path of nn.TransformerEncoderLayer and
    nn.MultiheadAttention, Swin's ``F.linear(x, self.proj.weight, ...)``): the dense weight decoded
    from the codes, in ``weight_dtype`` (the replaced layer's dtype; ``model.to(dtype)`` moves it).
    """

    def __init__(self, encoded: EncodedWeight, bias: torch.Tensor | None = None, act_bits: int = 0,
                 weight_dtype: torch.dtype = torch.float32):
        super().__init__()
        for name, t in zip(PACKED, encoded.tensors()):
            self.register_buffer(name, t)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.bits = encoded.bits
        self.group_size = encoded.group_size
        self.in_features = encoded.in_features
        self.out_features = encoded.out_features
        self.act_bits = act_bits
        self.weight_dtype = weight_dtype

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight ``[out_features, in_features]`` the codes represent, decoded at every
        access; dtype ``weight_dtype``, on the codes' device, not a Parameter, no gradient.

        Nothing is cached, so no dense copy stays resident: each access costs one full decode
        (about the work of one forward at batch 1, and a transient ``out x in`` tensor). Code that
        only checks ``.dtype`` / ``.device`` / ``.shape`` pays it too: read ``weight_dtype``,
        ``codes.device`` or ``(out_features, in_features)`` instead where you can. Computing with
        it (``F.linear(x, layer.weight)``) gives the values ``forward`` multiplies by.
        """
        return self.dequantize().to(self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not torch.compiler.is_compiling() and x.device.type == "cpu"
                and not (x.requires_grad and torch.is_grad_enabled())):
            # eager inference on CPU: the op's CPU implementation without the dispatcher and
            # custom-op wrapper (~30-60 us per call, more than a decode-step GEMV takes)
            fast = self._fast_buffers(x)
            if fast is not None:
                return linear_cpu(x, *fast, self.bits, self.group_size, self.in_features, self.act_bits)
        return linear(x, self.codes, self.groups, self.row_scale, self.bias, self.bits,
                      self.group_size, self.in_features, self.act_bits)

    def _fast_buffers(self, x: torch.Tensor):
        """(codes, groups, row_scale, bias) when ``x`` and the buffers pass the op's checks, else
        None (the op then runs, with its full checks and errors). The packed buffers are checked
        once per tensor object (re-checked when a buffer is replaced)."""
        buf = self._buffers  # plain dict reads: nn.Module.__getattr__ costs ~1 us per buffer
        t = (buf["codes"], buf["groups"], buf["row_scale"], buf["bias"])
        seen = self.__dict__.get("_rs_checked")
        if seen is None or any(a is not b for a, b in zip(seen, t)):
            if not fast_checks_pass(x, *t, self.bits, self.group_size, self.in_features, self.act_bits):
                return None
            self.__dict__["_rs_checked"] = t
        if x.dtype != torch.float32 or x.shape[-1] != self.in_features:
            return None
        return t

    def dequantize(self) -> torch.Tensor:
        """The dense float32 weight [out, in] the codes represent (what the op multiplies by)."""
        return decode_weight(self.codes, self.groups, self.row_scale, self.bits, self.group_size,
                             self.in_features)

    @classmethod
    def from_meta(cls, meta: dict, packed: dict[str, torch.Tensor],
                  bias: torch.Tensor | None) -> CompressedLinear:
        """The layer :meth:`meta` and the packed buffers (named as in
        Format.packed_specs) describe: what load rebuilds a saved layer from."""
        enc = EncodedWeight(*(packed[name] for name in PACKED),
                            Format(meta["bits"], meta["group_size"]), meta["in_features"])
        return cls(enc, bias, meta["act_bits"], bias.dtype if bias is not None else torch.float32)

    def meta(self) -> dict:
        return dict(bits=self.bits, group_size=self.group_size, in_features=self.in_features,
                    out_features=self.out_features, bias=self.bias is not None, act_bits=self.act_bits)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}"
                + (f", act_bits={self.act_bits}" if self.act_bits else ""))


class CompressedEmbedding(_WeightDtype, nn.Embedding):
    """An nn.Embedding whose table is held only in the codec's format, read by rs::embedding.

    Built by :func:`compress_embedding`, which also covers subclasses of nn.Embedding: their
    class is combined with this one so that their own ``forward`` runs and its
    ``super().forward(ids)`` lands here (e.g. Gemma's embedding, which scales the rows).
    ``weight`` is a meta tensor of the table's shape and dtype: code that only inspects it (dtype
    checks) keeps working, code that computes with it fails loudly instead of reading a stale
    dense copy; convert checks every subclass against the original before swapping it in.
    Rows come out in ``weight_dtype``, the replaced table's dtype (decoded in float32).
    """

    def __init__(self) -> None:  # use compress_embedding: nn.Embedding.__init__ would allocate
        raise TypeError("build a CompressedEmbedding with rs_compile.modules.compress_embedding")

    @property
    def weight(self) -> torch.Tensor:
        return torch.empty((self.num_embeddings, self.embedding_dim), dtype=self.weight_dtype,
                           device="meta")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = embedding(ids, self.codes, self.groups, self.row_scale, self.bits, self.group_size,
                         self.embedding_dim)
        return rows if self.weight_dtype == torch.float32 else rows.to(self.weight_dtype)

    def dequantize(self) -> torch.Tensor:
        """The dense float32 table [num_embeddings, embedding_dim] the codes represent."""
        return decode_weight(self.codes, self.groups, self.row_scale, self.bits, self.group_size,
                             self.embedding_dim)

    def meta(self) -> dict:
        return dict(bits=self.bits, group_size=self.group_size, in_features=self.embedding_dim,
                    out_features=self.num_embeddings, bias=False, kind="embedding")

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"


def compress_embedding(module: nn.Embedding, encoded: EncodedWeight) -> CompressedEmbedding:
    """A CompressedEmbedding standing in for ``module`` (its class kept when it is a subclass),
    with every attribute of ``module`` but the dense ``weight``. ``module`` is not modified."""
    cls = _compressed_class(type(module))
    new = cls.__new__(cls)
    state = dict(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        state[key] = dict(state[key])
    state["_parameters"].pop("weight", None)
    new.__dict__.update(state)
    for name, t in zip(PACKED, encoded.tensors()):
        new.register_buffer(name, t)
    new.bits, new.group_size = encoded.bits, encoded.group_size
    new.weight_dtype = module.weight.dtype
    return new


@functools.cache
def _compressed_class(cls: type) -> type:
    """CompressedEmbedding for nn.Embedding; for a subclass, one class deriving from both (built
    once per subclass, so that every converted model shares it)."""
    if cls is nn.Embedding:
        return CompressedEmbedding
    return type(f"Compressed{cls.__name__}", (cls, CompressedEmbedding), {"__module__": __name__})
