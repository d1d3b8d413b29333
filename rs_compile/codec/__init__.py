"""Weight codes on log-map-shaped level grids: the stored layout (format) and the offline encoder
(encode)."""

from rs_compile.codec.encode import EncodedWeight, encode
from rs_compile.codec.format import SUPPORTED_BITS, decode_weight

__all__ = ["EncodedWeight", "encode", "decode_weight", "SUPPORTED_BITS"]
