"""Uniform recipes: one recipe for every expert projection, or one per projection kind."""

from __future__ import annotations

from moepack.errors import CodecError

# Candidate uniform recipes, from most to least faithful.
UNIFORM_LADDER = (
    "q4g32", "q4g64", "q4g128", "q3g32", "q3g64", "q3g128", "q2g32", "q2g64", "q2g128",
    "2:4+q4g64", "2:4+q4g128", "2:4+q3g128", "2:4+q2g64", "2:4+q2g128",
    "1:4+q4g64", "1:4+q4g128", "1:4+q3g128",
)
PROJ_KINDS = ("up", "gate", "down")


def parse_recipe_spec(text: str) -> dict[str, str]:
    """'q4g128' -> same recipe for up/gate/down; 'up=q2g64,gate=q4g128,down=q4g128' -> per projection."""
    from moepack.codecs import parse_recipe

    if "=" not in text:
        return {p: str(parse_recipe(text)) for p in PROJ_KINDS}
    out: dict[str, str] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in PROJ_KINDS:
            raise CodecError(f"unknown projection {key!r} in recipe {text!r}; use up=..., gate=..., down=...")
        out[key] = str(parse_recipe(value.strip()))
    missing = [p for p in PROJ_KINDS if p not in out]
    if missing:
        raise CodecError(f"recipe {text!r} names no recipe for {', '.join(missing)}")
    return out


def uniform_for_ratio(target: float, shape: tuple[int, int], source_bytes_per_weight: float) -> tuple[str, float]:
    """The most faithful uniform recipe whose per-expert ratio reaches `target` (recipe, ratio)."""
    from moepack.codecs import encoded_nbytes, parse_recipe

    best_ratio = 0.0
    for name in UNIFORM_LADDER:
        try:
            nbytes = encoded_nbytes(parse_recipe(name), shape)
        except CodecError:
            continue  # the recipe does not fit this shape (group larger than a row, ...)
        ratio = shape[0] * shape[1] * source_bytes_per_weight / nbytes
        best_ratio = max(best_ratio, ratio)
        if ratio >= target:
            return name, ratio
    raise CodecError(f"no uniform recipe reaches ratio {target:g} on experts of shape {list(shape)}; "
                     f"the best is {best_ratio:.2f}. Use a smaller --target-ratio.")
