"""render_chat_template against transformers' apply_chat_template(tokenize=False)."""

from __future__ import annotations

import datetime

import pytest
import tokenizers
from transformers import PreTrainedTokenizerFast

from edge_runtime.chat_template import compile_chat_template, render_chat_template
from edge_runtime.errors import CheckpointError, InvalidRequest

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Block tags on their own lines: trim_blocks and lstrip_blocks decide the whitespace.
WHITESPACE = """{{ bos_token }}
{% for message in messages %}
    {% if message.role == 'system' %}
        [SYS] {{ message.content }}
    {% else %}
        [{{ message.role | upper }}] {{ message.content }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
[ASSISTANT]
{% endif %}
"""

TOOLS = """{% if tools %}Tools:
{% for tool in tools %}{{ tool | tojson(indent=2) }}
{% endfor %}{% endif %}{% for m in messages %}{{ m.role }}: {{ m.content | default('') }}
{% if m.tool_calls is defined %}{% for call in m.tool_calls %}call {{ call.function | tojson }}
{% endfor %}{% endif %}{% endfor %}"""

LOOP_CONTROLS = """{% set ns = namespace(count=0) %}{% for m in messages %}\
{% if m.role == 'system' %}{% continue %}{% endif %}
{% if ns.count >= 2 %}{% break %}{% endif %}{% set ns.count = ns.count + 1 %}{{ loop.index }}:{{ m.content }}
{% endfor %}count={{ ns.count }}"""

REASONING = """{% for m in messages %}{{ m.role }}|{{ m.reasoning_content | default('-') }}|\
{{ m.thinking | default('-') }}|{{ 'content' in m }}
{% endfor %}"""

GENERATION_TAG = """{% for m in messages %}{% if m.role == 'assistant' %}\
{% generation %}A: {{ m.content }}{% endgeneration %}{% else %}U: {{ m.content }}{% endif %}
{% endfor %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "Be brief. Ünïcödé ✓ 中文"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And \"quotes\" </tags> & more?"},
    ],
]

TOOL_LIST = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city — «now»",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

TOOL_CALL_CHAT = [
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}],
    },
    {"role": "tool", "content": '{"temp": 21}'},
]


def _reference(template: str, bos: str | None = "<s>", eos: str | None = "</s>") -> PreTrainedTokenizerFast:
    """A transformers tokenizer around a trivial vocabulary: only its template handling matters here."""
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template, bos_token=bos, eos_token=eos)


def _expected(template: str, messages: list[dict], bos: str | None = "<s>", eos: str | None = "</s>", **kwargs) -> str:
    return _reference(template, bos, eos).apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.mark.parametrize("template", [CHATML, WHITESPACE, LOOP_CONTROLS], ids=["chatml", "whitespace", "loops"])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["single", "multi"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(template: str, messages: list[dict], add_generation_prompt: bool) -> None:
    got = render_chat_template(
        template, messages, add_generation_prompt=add_generation_prompt, bos_token="<s>", eos_token="</s>"
    )
    assert got == _expected(template, messages, add_generation_prompt=add_generation_prompt)


def test_tools_and_tool_calls_match_transformers() -> None:
    got = render_chat_template(
        TOOLS, TOOL_CALL_CHAT, add_generation_prompt=False, bos_token="<s>", eos_token="</s>", tools=TOOL_LIST
    )
    assert got == _expected(TOOLS, TOOL_CALL_CHAT, tools=TOOL_LIST)
    assert "Zürich" in got and '"description": "Weather for a city — «now»"' in got  # tojson keeps non-ASCII


def test_reasoning_aliases_and_none_keys_match_transformers() -> None:
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "reasoning": "thought"},
    ]
    got = render_chat_template(REASONING, messages, add_generation_prompt=False, bos_token=None, eos_token=None)
    assert got == _expected(REASONING, messages)
    assert "assistant|thought|thought|False" in got


def test_generation_tag_renders_its_body() -> None:
    messages = CONVERSATIONS[1]
    got = render_chat_template(GENERATION_TAG, messages, add_generation_prompt=False, bos_token=None, eos_token=None)
    assert got == _expected(GENERATION_TAG, messages)
    assert "A: 4" in got


def test_missing_special_tokens_stay_undefined() -> None:
    template = "[{{ bos_token }}]{{ messages[0].content }}[{{ eos_token }}]{{ extra }}"
    messages = CONVERSATIONS[0]
    got = render_chat_template(
        template, messages, add_generation_prompt=True, bos_token=None, eos_token="</s>", extra="!"
    )
    assert got == _expected(template, messages, bos=None, add_generation_prompt=True, extra="!")
    assert got == "[]Hi there[</s>]!"


def test_raise_exception_is_invalid_request() -> None:
    template = "{% if messages[0].role != 'system' %}{{ raise_exception('System message first, please') }}{% endif %}"
    with pytest.raises(InvalidRequest) as info:
        render_chat_template(template, CONVERSATIONS[0], add_generation_prompt=True, bos_token=None, eos_token=None)
    assert info.value.param == "messages"
    assert "System message first, please" in str(info.value)


def test_template_type_errors_and_sandbox_are_invalid_request() -> None:
    concat = "{{ messages[0].content + 1 }}"
    mutate = "{{ messages.append(1) }}"
    for template in (concat, mutate):
        with pytest.raises(InvalidRequest):
            render_chat_template(template, CONVERSATIONS[0], add_generation_prompt=True, bos_token=None, eos_token=None)


def test_strftime_now() -> None:
    got = render_chat_template(
        "{{ strftime_now('%Y') }}", CONVERSATIONS[0], add_generation_prompt=True, bos_token=None, eos_token=None
    )
    assert got in {str(datetime.date.today().year), str(datetime.date.today().year + 1)}


def test_templates_compile_once() -> None:
    assert compile_chat_template(CHATML) is compile_chat_template(CHATML)


def test_bad_syntax_is_checkpoint_error() -> None:
    with pytest.raises(CheckpointError, match="does not compile"):
        render_chat_template("{% for %}", CONVERSATIONS[0], add_generation_prompt=True, bos_token=None, eos_token=None)


@pytest.mark.parametrize("messages", [[], ["not a message"]], ids=["empty", "not-an-object"])
def test_bad_messages_are_invalid_request(messages: list) -> None:
    with pytest.raises(InvalidRequest) as info:
        render_chat_template(CHATML, messages, add_generation_prompt=True, bos_token=None, eos_token=None)
    assert info.value.param == "messages"
