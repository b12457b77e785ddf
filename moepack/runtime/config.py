"""Run options as typed objects, validated once.

`RunConfig` holds every option that shapes how a pack is loaded and executed (budget, device, cache,
prefetch, approximations, batching); `SamplingParams` what one request asks for (token count,
temperature, top-p, seed). The CLI, the Python API, the server and `plan` all build the same objects,
so a value is checked in one place and means the same thing in every mode:

    config = RunConfig.build(vram="11GB", cache_policy="reuse", adaptive_k="auto")
    model = MoePackModel.load("mixtral.moepack", config)

`build` takes what a user types (strings such as '11GB', 'auto', 'off', '0.7') or typed values, and
raises `ConfigError` naming the option as the CLI spells it. Options that only mean something together
(`--fallback` without `--adaptive-k`, `--partial-loads` without `--sparse-channels`, ...) are refused
when given alone, never dropped."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from moepack.errors import ConfigError, MoepackError
from moepack.units import parse_size

CACHE_POLICIES = ("reuse", "lru", "lfu", "fate")
PREFETCH_MODES = ("none", "fate")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "torch", "cpp", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DEFAULT_CONTEXT = 2048  # capped at the model's max_position_embeddings (RunConfig.context_for)
DEFAULT_FALLBACK = 0.7  # big-little: tokens whose little half carries less router weight never fall back
DEFAULT_PREFETCH_MIN_PROB = 0.75  # predictions less likely than this only hint the cache policy

Fraction = float | str | None  # a share in (0, 1], 'auto' (from the pack's profile), or None: off


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _fraction(value: Any, name: str, *, auto: bool = True) -> Fraction:
    """'off' / None / False -> None; 'auto' -> 'auto'; else a number in (0, 1]."""
    if value is None or value is False:
        return None
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("off", "none", "no", ""):
            return None
        if auto and word == "auto":
            return "auto"
        try:
            value = float(word)
        except ValueError:
            raise ConfigError(f"{_flag(name)} takes off{', auto' if auto else ''} or a number in (0, 1], "
                              f"not {value!r}") from None
    value = float(value)
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ConfigError(f"{_flag(name)} takes off{', auto' if auto else ''} or a number in (0, 1], not {value:g}")
    return value


def _choice(value: Any, name: str, choices: tuple[str, ...], aliases: dict[str, str] | None = None) -> str:
    word = str(value).strip().lower()
    word = (aliases or {}).get(word, word)
    if word not in choices:
        raise ConfigError(f"{_flag(name)} takes one of {', '.join(choices)}, not {value!r}")
    return word


def _positive_int(value: Any, name: str, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    try:
        number = int(value)
        if number != value and not isinstance(value, str):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{_flag(name)} takes a whole number, not {value!r}") from None
    if number < 1:
        raise ConfigError(f"{_flag(name)} must be at least 1, not {number}")
    return number


def _size(value: Any, name: str) -> int | None:
    if value is None:
        return None
    text = str(value).strip()
    if text.startswith("-"):
        raise ConfigError(f"{_flag(name)} must be positive, not {text}")
    try:
        size = parse_size(value)
    except MoepackError as exc:  # it names the accepted forms
        raise ConfigError(f"{_flag(name)}: {exc}") from None
    if size <= 0:
        raise ConfigError(f"{_flag(name)} must be positive, not {text}")
    return size


@dataclass(frozen=True)
class RunConfig:
    """Every option of a run, typed and validated (build with `RunConfig.build`)."""

    # budget and device
    vram: int | None = None  # bytes on the device for dense + KV + workspace + expert slots; None: no bound
    device: str = "auto"
    backend: str = "auto"
    dtype: str = "auto"
    context: int | None = None  # tokens per sequence the KV cache is planned for; None: the default
    threads: int | None = None  # torch's intra-op threads; None: leave as it is
    verify: bool = True  # check every expert's checksum when it is read
    # cache and prefetch
    cache_policy: str = "reuse"
    cache_prior: bool = False
    bypass: bool = True
    prefetch: str = "none"
    prefetch_width: int | None = None  # predicted experts per token; None: the model's top-k
    prefetch_min_prob: float | None = None  # None: DEFAULT_PREFETCH_MIN_PROB
    # approximations
    adaptive_k: Fraction = None
    fallback: Fraction = None  # None: DEFAULT_FALLBACK with adaptive_k; 'off'; 0: every token may
    sparse_channels: Fraction = None
    partial_loads: bool = False
    # sequences in flight (a single prompt is batches = batch_size = 1)
    batches: int = 1
    batch_size: int = 1

    @classmethod
    def build(cls, **options: Any) -> RunConfig:
        """A validated config from typed values or the strings a user types. Unknown names are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown run option(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in options.items() if v is not None}).validated()  # None: the default

    def validated(self) -> RunConfig:
        """The same options, normalised (names lower-case, sizes in bytes, fractions as floats) or ConfigError."""
        c = {f.name: getattr(self, f.name) for f in fields(self)}
        c["vram"] = _size(c["vram"], "vram")
        c["device"] = str(c["device"]).strip().lower()
        if not (c["device"] in DEVICES or c["device"].startswith("cuda:")):
            raise ConfigError(f"--device takes auto, cpu, cuda or cuda:N, not {self.device!r}")
        c["backend"] = _choice(c["backend"], "backend", BACKENDS)
        dtype = c["dtype"]
        if not isinstance(dtype, str) and str(dtype).startswith("torch."):  # a torch.dtype from the API
            dtype = str(dtype).removeprefix("torch.")
        c["dtype"] = _choice(dtype, "dtype", DTYPES, _DTYPE_ALIASES)
        c["context"] = _positive_int(c["context"], "context", optional=True)
        c["threads"] = _positive_int(c["threads"], "threads", optional=True)
        c["cache_policy"] = _choice(c["cache_policy"], "cache_policy", CACHE_POLICIES)
        c["prefetch"] = _choice({"off": "none", "no": "none"}.get(str(c["prefetch"]).lower(), c["prefetch"]),
                                "prefetch", PREFETCH_MODES)
        c["prefetch_width"] = _positive_int(c["prefetch_width"], "prefetch_width", optional=True)
        if c["prefetch_min_prob"] is not None:
            p = c["prefetch_min_prob"]
            if not isinstance(p, (int, float)) or not (math.isfinite(p) and 0.0 <= p <= 1.0):
                raise ConfigError(f"--prefetch-min-prob takes a number in [0, 1], not {p!r}")
            c["prefetch_min_prob"] = float(p)
        for name in ("adaptive_k", "sparse_channels"):
            c[name] = _fraction(c[name], name)
        fb = c["fallback"]
        if fb is True:  # every big-little token may fall back
            c["fallback"] = 0.0
        elif fb is False:
            c["fallback"] = "off"
        elif isinstance(fb, (int, float)) and fb == 0:
            c["fallback"] = 0.0
        elif fb is not None:
            c["fallback"] = _fraction(fb, "fallback")
            if c["fallback"] is None:
                c["fallback"] = "off"
        c["batches"] = _positive_int(c["batches"], "batches")
        c["batch_size"] = _positive_int(c["batch_size"], "batch_size")
        for name in ("verify", "cache_prior", "bypass", "partial_loads"):
            if not isinstance(c[name], bool):
                raise ConfigError(f"{_flag(name)} is a switch (true or false), not {c[name]!r}")
        # options that only mean something beside another one: refused alone, never ignored
        if c["fallback"] not in (None, "off") and c["adaptive_k"] is None:
            raise ConfigError("--fallback needs --adaptive-k (it decides when a big-little token may skip a "
                              "missing big expert)")
        if c["partial_loads"] and c["sparse_channels"] is None:
            raise ConfigError("--partial-loads needs --sparse-channels (it reads only the kept channels' rows)")
        if c["prefetch"] == "none":
            for name in ("prefetch_width", "prefetch_min_prob"):
                if c[name] is not None:
                    raise ConfigError(f"{_flag(name)} needs --prefetch fate")
        if c["cache_prior"] and c["cache_policy"] not in ("lfu", "reuse"):
            raise ConfigError(f"--cache-prior seeds the lfu and reuse policies, not {c['cache_policy']}")
        return replace(self, **c)

    # -- resolved values --------------------------------------------------------------------------------
    @property
    def fallback_share(self) -> Fraction:
        """The big-little fallback threshold in force (None with big-little off)."""
        if self.adaptive_k is None or self.fallback == "off":
            return None
        return DEFAULT_FALLBACK if self.fallback is None else self.fallback

    @property
    def min_prob(self) -> float:
        return DEFAULT_PREFETCH_MIN_PROB if self.prefetch_min_prob is None else self.prefetch_min_prob

    @property
    def sequences(self) -> int:
        """Sequences in flight, each with its own KV cache."""
        return self.batches * self.batch_size

    def context_for(self, max_positions: int | None) -> int:
        """Tokens per sequence: the asked context, or the default capped at the model's positions."""
        if self.context is not None:
            return self.context
        return min(DEFAULT_CONTEXT, max_positions) if max_positions else DEFAULT_CONTEXT

    @property
    def streams_misses(self) -> bool:
        """Whether a miss may skip the cache (bypass, or partial loads of sparse experts): on CUDA such a
        miss streams through a one-slot transit buffer that the budget counts."""
        return self.bypass or (self.partial_loads and self.sparse_channels is not None)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> list[tuple[str, str]]:
        """(label, value) rows of the settings in force, for `run --stats`."""
        from moepack.units import format_size

        def onoff(v: Fraction) -> str:
            return "off" if v is None else (v if isinstance(v, str) else f"{v:g}")

        rows = [
            ("budget", "none (every expert available)" if self.vram is None else format_size(self.vram)),
            ("device / backend / dtype", f"{self.device} / {self.backend} / {self.dtype}"),
            ("cache policy", f"{self.cache_policy}, bypass {'on' if self.bypass else 'off'}"
                             + (", profiled prior" if self.cache_prior else "")),
            ("prefetch", self.prefetch if self.prefetch == "none"
             else f"{self.prefetch} (min probability {self.min_prob:g})"),
            ("big-little (adaptive k)", onoff(self.adaptive_k)
             + ("" if self.adaptive_k is None else f", fallback {onoff(self.fallback_share)}")),
            ("sparse channels (FloE)", onoff(self.sparse_channels)
             + (", partial loads" if self.partial_loads else "")),
        ]
        if self.sequences > 1:
            rows.append(("sequences in flight", f"{self.batches} batches of {self.batch_size}"))
        return rows


@dataclass(frozen=True)
class SamplingParams:
    """What one generation asks for: how many tokens, and how they are drawn."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        _positive_int(self.max_new_tokens, "max_new_tokens")
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ConfigError(f"--temperature takes a finite number >= 0 (0 = greedy), not {t!r}")
        p = self.top_p
        if not isinstance(p, (int, float)) or not math.isfinite(p) or not 0.0 < p <= 1.0:
            raise ConfigError(f"--top-p takes a number in (0, 1], not {p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ConfigError(f"--seed takes a whole number >= 0, not {self.seed!r}")
