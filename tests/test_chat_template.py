"""Chat templates render exactly as transformers' `apply_chat_template` (Mixtral [INST], ChatML/Qwen and a
Llama-3-style multi-line template with namespace, tojson and strftime_now), refuse what the template refuses,
fall back to the documented plain form, and find the end-of-turn tokens."""

from __future__ import annotations

import json

import pytest

from moepack.serve.template import PLAIN_STOPS, ChatTemplate, ChatTemplateError

transformers = pytest.importorskip("transformers")

MIXTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
QWEN = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = """{{- bos_token }}
{%- set ns = namespace(system='', turns=0) %}
{%- if messages[0]['role'] == 'system' %}
    {%- set ns.system = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{{- 'Today Date: ' + strftime_now('%Y') + '\\n' }}
{{- ns.system + '<|eot_id|>' }}
{% for message in messages %}
    {% set ns.turns = ns.turns + 1 %}
    {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {% if message['role'] == 'tool' %}
        {{ message['content'] | tojson }}
    {% else %}
        {{ message['content'] | trim }}
    {% endif %}
    {{ '<|eot_id|>' }}
{% endfor %}
{% if add_generation_prompt %}
{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{% endif %}
"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "user", "content": "Shall I compare thee?"}, {"role": "assistant", "content": "Thou art lovelier."},
     {"role": "user", "content": "<b>And</b> more \"temperate\" — é?"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "To be?"}],
    [{"role": "system", "content": "Rhyme."}, {"role": "user", "content": "1"}, {"role": "assistant", "content": "2"},
     {"role": "user", "content": "3"}],
]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    from moepack.testing.checkpoints import make_tokenizer_json

    return make_tokenizer_json(tmp_path_factory.mktemp("tok"))


def hf_tokenizer(path, template: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template=template)


@pytest.mark.parametrize("name,source", [("mixtral", MIXTRAL), ("qwen", QWEN), ("llama3", LLAMA3)])
@pytest.mark.parametrize("generation", [True, False])
def test_rendering_equals_transformers(tokenizer_json, name, source, generation):
    hf = hf_tokenizer(tokenizer_json, source)
    ours = ChatTemplate.from_config({"chat_template": source, "bos_token": "<s>",
                                     "eos_token": {"content": "</s>", "special": True}, "unk_token": "<unk>"})
    compared = 0
    for conv in CONVERSATIONS:
        try:
            want = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=generation)
        except Exception as exc:  # the template refuses it (Mixtral has no system role): so must we
            with pytest.raises(ChatTemplateError, match="refused"):
                ours.render(conv, add_generation_prompt=generation)
            assert "roles" in str(exc) or "alternate" in str(exc)
            continue
        assert ours.render(conv, add_generation_prompt=generation) == want, (name, conv)
        compared += 1
    assert compared >= 2


def test_tool_content_goes_through_tojson_unescaped(tokenizer_json):
    conv = [{"role": "user", "content": "x"}, {"role": "tool", "content": {"a": "<é>"}}]
    hf = hf_tokenizer(tokenizer_json, LLAMA3)
    ours = ChatTemplate.from_config({"chat_template": LLAMA3, "bos_token": "<s>"})
    assert ours.render(conv) == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert json.dumps({"a": "<é>"}, ensure_ascii=False) in ours.render(conv)


def test_plain_fallback_and_named_templates():
    plain = ChatTemplate.from_config({"eos_token": "</s>"})
    assert plain.plain and plain.stop_strings == PLAIN_STOPS
    text = plain.render([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"}])
    assert text == "System: S\n\nUser: hi\nAssistant: yo\nUser: again\nAssistant:"
    named = ChatTemplate.from_config({"chat_template": [{"name": "tool_use", "template": "T"},
                                                        {"name": "default", "template": "D{{ messages|length }}"}]})
    assert named.render([{"role": "user", "content": "x"}]) == "D1" and not named.plain
    assert ChatTemplate.from_config({"chat_template": "ignored"}, "file {{ bos_token }}").source.startswith("file")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate.from_config({"chat_template": "{% for %}"})


def test_sandbox_refuses_escapes():
    evil = ChatTemplate.from_config({"chat_template": "{{ ''.__class__.__mro__ }}"})
    with pytest.raises(ChatTemplateError):
        evil.render([{"role": "user", "content": "x"}])
    ns = ChatTemplate.from_config({"chat_template": "{% set n = namespace(_x=1) %}{{ n }}"})
    with pytest.raises(Exception, match="_x"):
        ns.render([{"role": "user", "content": "x"}])


def test_stop_ids_name_eos_and_the_turn_markers(tokenizer_json):
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.add_special_tokens([AddedToken("<|im_end|>", special=True)])
    im_end = tok.token_to_id("<|im_end|>")
    qwen = ChatTemplate.from_config({"chat_template": QWEN, "eos_token": "</s>"})
    assert qwen.stop_ids(tok, (7,)) == frozenset({7, tok.token_to_id("</s>"), im_end})
    mixtral = ChatTemplate.from_config({"chat_template": MIXTRAL, "eos_token": "</s>"})
    assert mixtral.stop_ids(tok) == frozenset({tok.token_to_id("</s>")})


def test_cli_and_chat_do_not_import_the_web_stack():
    import subprocess
    import sys

    code = ("import sys, moepack.cli.app, moepack.cli.chat_cmd, moepack.serve.worker, moepack.serve.template; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'jinja2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
