"""Model loaders: real trained checkpoints read offline (``tinystories``, ``minilm``) and
random-weight transformers of known shapes (``configs``)."""

from rs_compile._lazy import lazy_submodules

__getattr__, __dir__ = lazy_submodules(__name__, ("configs", "gemma3", "minilm", "tinystories"),
                                       globals())
