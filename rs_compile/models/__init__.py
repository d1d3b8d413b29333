"""Model loaders: real trained checkpoints read offline (``tinystories``, ``minilm``) and
random-weight transformers of known shapes (``configs``)."""
