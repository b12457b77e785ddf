"""Chat templates: a conversation -> the prompt text the model was trained on, and the tokens that end a turn.

The pack keeps the source checkpoint's `tokenizer_config.json` (and `chat_template.jinja` when the source had
one, which wins, as in transformers). The template is rendered with the semantics of transformers'
`apply_chat_template`: jinja2's ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the
loopcontrols extension, `raise_exception(msg)`, a `tojson` filter that does not escape HTML, `strftime_now`,
`add_generation_prompt`, and the special tokens (`bos_token`, `eos_token`, ...) as variables. Messages whose
value is None drop that key, as transformers does.

Packs without a template get the documented plain fallback (PLAIN_TEMPLATE):

    System: {system}            (only when there is a system message)

    User: {user}
    Assistant: {assistant}
    User: {user}
    Assistant:

with the extra stop string "\\nUser:" so that the model does not write the user's next turn.

Generation stops at the end-of-turn tokens: the eos token of tokenizer_config.json, the model's eos ids
(config.json and generation_config.json), and the well-known turn markers (`<|im_end|>`, `<|eot_id|>`,
`<|end|>`, `<end_of_turn>`, `<|endoftext|>`) that the template writes and the vocabulary holds."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from moepack.errors import MoepackError

PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}System: {{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
PLAIN_STOPS = ("\nUser:",)
TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>")
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
MAX_FILE_BYTES = 8 << 20  # a tokenizer_config.json larger than this is not one


class ChatTemplateError(MoepackError):
    """The chat template cannot be compiled, or refuses the conversation (its raise_exception)."""


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _compile(source: str):
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatTemplateError("chat templates need jinja2 (pip install 'moepack[serve]')") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    class Namespace(jinja2.utils.Namespace):  # no underscore attributes: nothing reaches CPython internals
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set the attribute {name!r}")

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["namespace"] = Namespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {exc}") from None


@dataclass
class ChatTemplate:
    """A compiled chat template with its special tokens and what ends a turn."""

    source: str
    special: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... as strings
    stop_strings: tuple[str, ...] = ()
    plain: bool = False  # the fallback, not the model's own template

    def __post_init__(self) -> None:
        self._compiled = _compile(self.source)

    @classmethod
    def from_config(cls, config: dict[str, Any] | None, template_file: str | None = None) -> ChatTemplate:
        """From a parsed tokenizer_config.json (and the text of chat_template.jinja, which wins)."""
        config = config or {}
        special = {name: text for name in SPECIAL_NAMES if (text := _token_text(config.get(name))) is not None}
        source = template_file
        if source is None:
            source = config.get("chat_template")
            if isinstance(source, list):  # named templates: [{"name": "default", "template": "..."}, ...]
                named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
                source = named.get("default")
        if source is None:
            return cls(PLAIN_TEMPLATE, special, PLAIN_STOPS, plain=True)
        if not isinstance(source, str):
            raise ChatTemplateError("tokenizer_config.json's chat_template is not a string")
        return cls(source, special)

    @classmethod
    def from_pack(cls, pack) -> ChatTemplate:
        """The template of a pack (runtime.format.Pack): chat_template.jinja, else tokenizer_config.json's
        chat_template, else the plain fallback."""
        files = pack.manifest.files
        config, text = None, None
        if "tokenizer_config.json" in files:
            raw = _read(pack, "tokenizer_config.json")
            try:
                config = json.loads(raw)
            except ValueError as exc:
                raise ChatTemplateError(f"tokenizer_config.json is not JSON: {exc}", path=pack.path) from None
            if not isinstance(config, dict):
                raise ChatTemplateError("tokenizer_config.json is not a JSON object", path=pack.path)
        if "chat_template.jinja" in files:
            text = _read(pack, "chat_template.jinja")
        return cls.from_config(config, text)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **extra) -> str:
        """The prompt text of a conversation (messages: dicts with role and content)."""
        import jinja2

        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._compiled.render(messages=chat, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **{**self.special, **extra})
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"the chat template refused the conversation: {exc}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise ChatTemplateError(f"the chat template failed on the conversation: {exc}") from None

    def stop_ids(self, tokenizer, model_eos: tuple[int, ...] = ()) -> frozenset[int]:
        """Token ids that end a turn: eos, the model's eos ids and the turn markers the template uses."""
        ids = set(model_eos)
        names = [self.special.get("eos_token")] + [m for m in TURN_MARKERS if m in self.source]
        for name in names:
            if name and tokenizer is not None and (tid := tokenizer.token_to_id(name)) is not None:
                ids.add(tid)
        return frozenset(ids)


def _read(pack, name: str) -> str:
    path = Path(pack.file_path(name))
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ChatTemplateError(f"{name} is larger than {MAX_FILE_BYTES >> 20} MiB", path=pack.path)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ChatTemplateError(f"{name} is not UTF-8 (byte {exc.start})", path=pack.path) from None


def generation_eos_ids(pack) -> tuple[int, ...]:
    """eos ids of generation_config.json (an int or a list), when the pack has one."""
    if "generation_config.json" not in pack.manifest.files:
        return ()
    try:
        value = json.loads(_read(pack, "generation_config.json")).get("eos_token_id")
    except (ValueError, AttributeError):
        return ()
    values = value if isinstance(value, list) else [value]
    return tuple(v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0)
