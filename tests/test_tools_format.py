"""Tool formats in the engine, without a model: rendering (fallback section, tool results, GLM-4's
own template), the grammars they build (checked with llguidance on a real tokenizer), and the
streaming parsers split at every possible point."""

from __future__ import annotations

import json

import llguidance
import pytest
from tokenizers import Tokenizer as HfTokenizer
from tokenizers import models, pre_tokenizers

from edge_runtime.errors import InvalidRequest
from edge_runtime.grammar import GrammarSpec, parse_grammar
from edge_runtime.tokenizer import Tokenizer, TokenizerInfo
from edge_runtime.tools import Glm4Format, HermesFormat, HermesParser, Glm4Parser, parse_tools, tool_format

from agent_harness import TOOLS

CALL = '<tool_call>\n{"name": "read_sensor", "arguments": {"sensor": "humidity", "room": "attic"}}\n</tool_call>'
# GLM-4-0414's chat template, cut to what tools touch.
GLM4_TEMPLATE = (
    "[gMASK]<sop>{%- if tools -%}<|system|>\n# 可用工具\n{% for tool in tools %}{%- set function = tool.function if tool.get(\"function\") else tool %}"
    "\n\n## {{ function.name }}\n\n{{ function | tojson(indent=4, ensure_ascii=False) }}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
    "{%- endfor %}{%- endif -%}{%- for msg in messages %}{%- if msg.role == 'system' %}<|system|>\n{{ msg.content }}{%- endif %}"
    "{%- endfor %}{%- for message in messages if message.role != 'system' %}{%- set role = message['role'] %}"
    "{%- set content = message['content'] %}{%- set meta = message.get(\"metadata\", \"\") %}{%- if role == 'user' %}<|user|>\n{{ content }}"
    "{%- elif role == 'assistant' and not meta %}<|assistant|>\n{{ content }}{%- elif role == 'assistant' and meta %}<|assistant|>{{ meta }}"
    "\n{{ content }}{%- elif role == 'observation' %}<|observation|>\n{{ content }}{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>{% endfor %}{% else %}{{ m.content }}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(template: str | None) -> Tokenizer:
    backend = HfTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    info = TokenizerInfo(bos_token_id=None, eos_token_ids=[], add_bos_token=False, chat_template=template, vocab_size=1)
    return Tokenizer(backend, info)


def _history() -> list[dict]:
    call = {"id": "call_1", "type": "function", "function": {"name": "read_sensor", "arguments": '{"sensor": "humidity", "room": "attic"}'}}
    return [
        {"role": "user", "content": "How humid is the attic?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"value": 63}'},
        {"role": "tool", "tool_call_id": "call_2", "content": '{"value": 64}'},
    ]


def test_format_follows_the_template():
    assert tool_format(None).name == "hermes" and not tool_format(None).native
    assert tool_format("{% for m in messages %}{{ m.content }}{% endfor %}").native is False
    assert tool_format(HERMES_TEMPLATE).native is True
    assert tool_format(GLM4_TEMPLATE).name == "glm4"


def test_fallback_lists_tools_and_renders_calls_and_results():
    tools = parse_tools(TOOLS)
    out = HermesFormat(native=False).fallback_messages([{"role": "system", "content": "Be brief."}, *_history()], tools, "tool")
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.\n\n# Tools")
    assert json.dumps(tools[0].as_openai()) in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": CALL}
    # both results in one turn, in order
    assert out[3] == {"role": "tool", "content": '<tool_response>\n{"value": 63}\n</tool_response>\n<tool_response>\n{"value": 64}\n</tool_response>'}
    assert len(out) == 4


def test_fallback_puts_results_in_a_user_turn_when_the_template_drops_tool_turns():
    only_user_and_assistant = "{% for m in messages %}{% if m.role in ['user', 'assistant', 'system'] %}[{{ m.role }}]{{ m.content }}{% endif %}{% endfor %}"
    text = HermesFormat(native=False).render(_tokenizer(only_user_and_assistant), _history(), parse_tools(TOOLS))
    assert '[user]<tool_response>\n{"value": 63}' in text


def test_native_template_gets_tools_and_argument_objects():
    text = HermesFormat(native=True).render(_tokenizer(HERMES_TEMPLATE), _history()[:2], parse_tools(TOOLS))
    assert '"name": "read_sensor"' in text.split("</tools>")[0]
    assert '<tool_call>\n{"name": "read_sensor", "arguments": {"sensor": "humidity", "room": "attic"}}\n</tool_call>' in text


def test_glm4_renders_metadata_and_observation_turns():
    text = Glm4Format(tools_on_message=False).render(_tokenizer(GLM4_TEMPLATE), _history()[:3], parse_tools(TOOLS))
    assert "## read_sensor" in text
    assert '<|assistant|>read_sensor\n{"sensor": "humidity", "room": "attic"}<|observation|>\n{"value": 63}<|assistant|>' in text


@pytest.fixture(scope="module")
def lltok(agent_model_dir):
    tok = Tokenizer.from_dir(agent_model_dir)
    return llguidance.LLTokenizer(tok.to_json(), eos_token=tok.eos_token_ids), tok


def _accepts(lltok, grammar: str, text: str) -> bool:
    ll, tok = lltok
    matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return matcher.consume_tokens(tok.encode(text, add_special_tokens=False)) and matcher.is_accepting()


def test_hermes_grammar_modes(lltok):
    tools = parse_tools(TOOLS)
    fmt = HermesFormat(native=False)
    required = fmt.grammar(tools, GrammarSpec("tool_calls", mode="required", parallel=False))
    auto = fmt.grammar(tools, GrammarSpec("tool_calls", mode="auto"))
    named = fmt.grammar(tools, GrammarSpec("tool_calls", mode="required", names=("set_valve",)))
    assert _accepts(lltok, required, CALL)
    assert not _accepts(lltok, required, "Hello")
    assert not _accepts(lltok, required, CALL + "\n" + CALL)  # not parallel
    assert _accepts(lltok, auto, "Just text.") and _accepts(lltok, auto, "Let me look. " + CALL + "\n" + CALL)
    assert not _accepts(lltok, auto, CALL.replace('"attic"', "attic"))  # arguments follow the schema
    assert not _accepts(lltok, named, CALL)
    assert _accepts(lltok, named, '<tool_call>\n{"name": "set_valve", "arguments": {"valve": 3, "open": true}}\n</tool_call>')


def test_glm4_grammar(lltok):
    grammar = Glm4Format(False).grammar(parse_tools(TOOLS), GrammarSpec("tool_calls", mode="auto"))
    assert _accepts(lltok, grammar, "\nJust text.")
    assert _accepts(lltok, grammar, 'set_valve\n{"valve": 1, "open": false}')
    assert not _accepts(lltok, grammar, 'set_valve\n{"valve": 9, "open": false}')


def _parse_in_pieces(parser, text: str, cut: int) -> tuple[str, dict[int, dict]]:
    content, calls = [], {}
    for piece in (text[:cut], text[cut:]):
        out, deltas = parser.push(piece)
        content.append(out)
        for d in deltas:
            call = calls.setdefault(d.index, {"name": None, "arguments": ""})
            call["name"] = call["name"] or d.name
            call["arguments"] += d.arguments
    out, _ = parser.flush()
    return "".join(content) + out, calls


@pytest.mark.parametrize("text", [
    "Let me check. " + CALL + "\n" + CALL.replace("attic", "cel}lar\\\""),
    "No calls, just <tool text.",
])
def test_hermes_parser_any_split(text):
    expected_content = text.split("<tool_call>")[0]
    for cut in range(len(text) + 1):
        parser = HermesParser()
        content, calls = _parse_in_pieces(parser, text, cut)
        assert content == expected_content, cut
        assert parser.calls == len(calls) == text.count("<tool_call>")
        for call in calls.values():
            assert call["name"] == "read_sensor"
            assert json.loads(call["arguments"])["sensor"] == "humidity"


def test_glm4_parser_any_split():
    for text, content, name in [("\nPlain answer.", "Plain answer.", None), ('set_valve\n{"valve": 1, "open": true}', "", "set_valve")]:
        for cut in range(len(text) + 1):
            got, calls = _parse_in_pieces(Glm4Parser(), text, cut)
            assert got == content
            if name:
                assert calls[0]["name"] == name and json.loads(calls[0]["arguments"]) == {"valve": 1, "open": True}


@pytest.mark.parametrize("value, param", [
    ([{"type": "function", "function": {"name": "bad name"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "a", "parameters": {"type": "array"}}}], "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}], "tools[1].function.name"),
    ([{"type": "retrieval"}], "tools[0]"),
])
def test_bad_tools_name_the_entry(value, param):
    with pytest.raises(InvalidRequest) as info:
        parse_tools(value)
    assert info.value.param == param


@pytest.mark.parametrize("value, param", [
    ({"type": "regex"}, "grammar.type"),
    ({"type": "json_schema"}, "grammar.schema"),
    ({"type": "tool_calls", "mode": "sometimes"}, "grammar.mode"),
    ({"type": "json_object", "schema": {}}, "grammar.schema"),
])
def test_bad_grammar_names_the_key(value, param):
    with pytest.raises(InvalidRequest) as info:
        parse_grammar(value)
    assert info.value.param == param
