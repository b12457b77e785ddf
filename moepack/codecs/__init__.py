"""Per-matrix codecs with a pure-torch reference decode (see docs/architecture.md, "Codecs").

    parse_recipe("2:4+q4g64+r16") -> Recipe
    encode(w, recipe, importance=None) -> dict[str, Tensor]     parts in payload order
    decode(parts, recipe, shape, dtype=torch.float32) -> Tensor the reference
    part_specs(recipe, shape) -> list[PartSpec]                 layout from recipe + shape alone
    encoded_nbytes(recipe, shape) -> int

Building blocks for kernels and benchmarks: pack_bits / unpack_bits, quantize / quantize_rtn /
dequantize, and sqnr_db.
"""

from moepack.codecs.bits import pack_bits, packed_nbytes, unpack_bits
from moepack.codecs.pipeline import decode, encode, encoded_nbytes, part_specs, sqnr_db
from moepack.codecs.quant import dequantize, quantize, quantize_rtn
from moepack.codecs.recipe import DTYPES, PartSpec, Recipe, as_recipe, parse_recipe
from moepack.codecs.registry import CODECS, Codec, get_codec

__all__ = [
    "CODECS",
    "Codec",
    "DTYPES",
    "PartSpec",
    "Recipe",
    "as_recipe",
    "decode",
    "dequantize",
    "encode",
    "encoded_nbytes",
    "get_codec",
    "pack_bits",
    "packed_nbytes",
    "parse_recipe",
    "part_specs",
    "quantize",
    "quantize_rtn",
    "sqnr_db",
    "unpack_bits",
]
