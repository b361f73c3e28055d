"""Tool-call and reasoning parsers on model texts written by hand in each family's format (from the formats'
public chat templates and documentation), whole and streamed char by char and in odd chunk sizes: the streamed
deltas must add up to the whole message, and the whole message must hold the calls the text spells."""

from __future__ import annotations

import json

import pytest

from server.entrypoints.chat_output import ChatOutput, ChatOutputConfig, finish_reason
from server.entrypoints.reasoning_parsers import reasoning_parser_class
from server.entrypoints.tool_parsers import TOOL_PARSERS, tool_parser_class

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}
TOOLS = [WEATHER, TIME]
PARIS = ("get_weather", {"city": "Paris", "days": 3})
TOKYO = ("get_time", {"zone": "Asia/Tokyo"})

# (parser, model text, content, calls [(name, arguments)])
CASES = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
               '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}\n</tool_call>',
     "Let me check.\n\n", [PARIS, TOKYO]),
    ("hermes", "No tools needed: 3 < 4 and <b>bold</b>.", "No tools needed: 3 < 4 and <b>bold</b>.", []),
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n"
                    "3\n</parameter>\n</function>\n</tool_call>", "", [PARIS]),
    ("qwen3_coder", "Sure.\n<tool_call>\n<function=get_time>\n<parameter=zone>\nAsia/Tokyo\n</parameter>\n</function>"
                    "\n</tool_call>", "Sure.\n", [TOKYO]),
    ("glm45", "I'll look it up.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
              "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call><tool_call>get_time\n<arg_key>zone"
              "</arg_key>\n<arg_value>Asia/Tokyo</arg_value>\n</tool_call>", "I'll look it up.\n", [PARIS, TOKYO]),
    ("minimax_m2", 'Checking.\n<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris'
                   '</parameter>\n<parameter name="days">3</parameter>\n</invoke>\n<invoke name="get_time">\n'
                   '<parameter name="zone">Asia/Tokyo</parameter>\n</invoke>\n</minimax:tool_call>',
     "Checking.\n", [PARIS, TOKYO]),
    ("deepseek_v3", "Let me see.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
                    '{"city": "Paris", "days": 3}\n```<｜tool▁call▁end｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>'
                    'get_time\n```json\n{"zone": "Asia/Tokyo"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
                    "<｜end▁of▁sentence｜>", "Let me see.", [PARIS, TOKYO]),
    ("deepseek_v31", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
                     '{"city": "Paris", "days": 3}<｜tool▁call▁end｜><｜tool▁calls▁end｜>', "", [PARIS]),
    ("kimi_k2", "Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
                '<|tool_call_argument_begin|>{"city": "Paris", "days": 3}<|tool_call_end|><|tool_call_begin|>'
                'functions.get_time:1<|tool_call_argument_begin|>{"zone": "Asia/Tokyo"}<|tool_call_end|>'
                "<|tool_calls_section_end|>", "Let me check.", [PARIS, TOKYO]),
    ("gpt-oss", '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris","days":3}'
                "<|call|>", "", [PARIS]),
    ("gpt-oss", "<|channel|>final<|message|>It is sunny in Paris.<|return|>", "It is sunny in Paris.", []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}', "", [PARIS]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}; '
                    '{"name": "get_time", "parameters": {"zone": "Asia/Tokyo"}}', "", [PARIS, TOKYO]),
    ("llama3_json", "The weather in Paris is mild.", "The weather in Paris is mild.", []),
]

CONTROL = ("<｜end▁of▁sentence｜>", "<|return|>")


def reader(parser: str | None, reasoning: str | None = None, in_reasoning: bool = False, **kw) -> ChatOutput:
    tools = tool_parser_class(parser, None)(TOOLS) if parser else None
    r = reasoning_parser_class(reasoning)() if reasoning else None
    content_parser = tool_parser_class(r.content_tool_parser, None)(None) if r and r.content_tool_parser else None
    mode = kw.pop("mode", "auto")
    return ChatOutput(ChatOutputConfig(reasoning=r, in_reasoning=in_reasoning, tools=tools, mode=mode,
                                       content_parser=content_parser, control_tokens=CONTROL, **kw))


def streamed(make, text: str, chunk: int) -> dict:
    """The message the deltas of ``text`` streamed in ``chunk``-character pieces add up to."""
    out = make()
    msg: dict = {"reasoning_content": "", "content": "", "tool_calls": []}
    pieces = [text[i:i + chunk] for i in range(0, len(text), chunk)]
    for k, piece in enumerate(pieces):
        delta = out.delta(piece, final=k == len(pieces) - 1)
        msg["reasoning_content"] += delta.get("reasoning_content", "")
        msg["content"] += delta.get("content", "")
        for tc in delta.get("tool_calls", []):
            if tc["index"] == len(msg["tool_calls"]):
                assert tc["type"] == "function" and tc["id"] and tc["function"]["name"]
                msg["tool_calls"].append({"name": tc["function"]["name"], "arguments": ""})
            else:
                assert "name" not in tc.get("function", {}) and "id" not in tc
            msg["tool_calls"][tc["index"]]["arguments"] += tc.get("function", {}).get("arguments", "")
    return msg


def calls_of(message: dict) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls", [])]


def test_every_format_has_a_case():
    assert {c[0] for c in CASES} == set(TOOL_PARSERS)


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_whole_and_streamed(parser, text, content, calls):
    whole = reader(parser).message(text)
    assert calls_of(whole) == calls
    assert (whole["content"] or "") == content
    assert whole["content"] is not None or calls
    ids = [c["id"] for c in whole.get("tool_calls", [])]
    assert len(set(ids)) == len(ids)
    for chunk in (1, 2, 3, 7, 13, len(text)):
        got = streamed(lambda: reader(parser), text, chunk)
        assert got["content"] == content, chunk
        assert [(c["name"], json.loads(c["arguments"])) for c in got["tool_calls"]] == calls, chunk


def test_kimi_keeps_the_models_call_ids():
    text = [c for c in CASES if c[0] == "kimi_k2"][0][1]
    assert [c["id"] for c in reader("kimi_k2").message(text)["tool_calls"]] == ["functions.get_weather:0",
                                                                                "functions.get_time:1"]


def test_tool_choice_none_leaves_calls_as_text_and_finish_reason():
    text = CASES[0][1]
    msg = reader("hermes", mode="none").message(text)
    assert "tool_calls" not in msg and msg["content"] == text
    assert streamed(lambda: reader("hermes", mode="none"), text, 3)["content"] == text
    assert finish_reason("stop", True) == "tool_calls" and finish_reason("length", True) == "length"


def test_parallel_tool_calls_false_keeps_the_first():
    msg = reader("hermes", single_call=True).message(CASES[0][1])
    assert calls_of(msg) == [PARIS]


# (reasoning parser, in_reasoning, text, reasoning, content)
REASONING = [
    ("qwen3", False, "<think>\nThe user wants Paris.\n</think>\n\nIt is sunny.", "\nThe user wants Paris.\n",
     "It is sunny."),
    ("qwen3", False, "It is sunny.", "", "It is sunny."),
    ("qwen3", True, "Paris, then.\n</think>\n\nIt is sunny.", "Paris, then.\n", "It is sunny."),
    ("deepseek-r1", True, "Hmm, Paris.</think>It is sunny.", "Hmm, Paris.", "It is sunny."),
    ("deepseek-r1", True, "Still thinking about Paris", "Still thinking about Paris", ""),
    ("glm45", False, "<think>Paris weather.</think>\nIt is sunny.", "Paris weather.", "It is sunny."),
    ("minimax-m2", True, "Paris weather.</think>\n\nIt is sunny.", "Paris weather.", "It is sunny."),
    ("kimi", False, "◁think▷Paris.◁/think▷It is sunny.", "Paris.", "It is sunny."),
    ("kimi_k2", False, "<think>Paris.</think>It is sunny.", "Paris.", "It is sunny."),
    ("deepseek-v3", True, "Paris.</think>It is sunny.", "Paris.", "It is sunny."),
    ("gpt-oss", False, "<|channel|>analysis<|message|>User asks about Paris.<|end|><|start|>assistant<|channel|>"
                       "final<|message|>It is sunny.<|return|>", "User asks about Paris.", "It is sunny."),
]


@pytest.mark.parametrize(("parser", "in_reasoning", "text", "reasoning", "content"), REASONING)
def test_reasoning_whole_and_streamed(parser, in_reasoning, text, reasoning, content):
    whole = reader(None, parser, in_reasoning).message(text)
    assert (whole["reasoning_content"] or "", whole["content"]) == (reasoning, content)
    for chunk in (1, 2, 5, 11):
        got = streamed(lambda: reader(None, parser, in_reasoning), text, chunk)
        assert (got["reasoning_content"], got["content"]) == (reasoning, content), chunk


@pytest.mark.parametrize(("reasoning", "tools", "text"), [
    ("qwen3", "hermes", "<think>Need weather.</think>\n\n<tool_call>\n"
                        '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'),
    ("gpt-oss", "gpt-oss", "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary "
                           'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris", "days": 3}<|call|>'),
    ("deepseek-r1", "deepseek_v3", "Need weather.</think><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function"
                                   '<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris", "days": 3}\n```'
                                   "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
])
def test_reasoning_then_tool_calls(reasoning, tools, text):
    in_reasoning = reasoning == "deepseek-r1"
    whole = reader(tools, reasoning, in_reasoning).message(text)
    assert whole["reasoning_content"] == "Need weather." and calls_of(whole) == [PARIS]
    assert not whole["content"]
    for chunk in (1, 4, 9):
        got = streamed(lambda: reader(tools, reasoning, in_reasoning), text, chunk)
        assert got["reasoning_content"] == "Need weather."
        assert [(c["name"], json.loads(c["arguments"])) for c in got["tool_calls"]] == [PARIS]


def test_reasoning_start_from_the_prompt():
    qwen3 = reasoning_parser_class("qwen3")()
    assert qwen3.starts_in_reasoning("<|im_start|>assistant\n<think>\n", None)
    assert not qwen3.starts_in_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n", None)
    assert not qwen3.starts_in_reasoning("<|im_start|>assistant\n", None)
    assert not qwen3.may_reason("<|im_start|>assistant\n", False)
    assert reasoning_parser_class("deepseek-r1")().starts_in_reasoning("<｜Assistant｜>", None)


def test_auto_detection_by_template():
    templates = {
        "hermes": "{% if tools %}<tools>{{ tools }}</tools> ... <tool_call>\\n{\"name\": ...}</tool_call>{% endif %}",
        "qwen3_coder": "<tool_call>\\n<function=example_function_name>\\n<parameter=example_parameter_1>",
        "glm45": "<tool_call>{function-name}\\n<arg_key>{arg-key-1}</arg_key>",
        "llama3_json": "Given the following functions, please respond with a JSON for a function call with its",
        "kimi_k2": "<|tool_calls_section_begin|>",
        "gpt-oss": "<|start|>assistant<|channel|>analysis<|message|>",
        "minimax_m2": "<minimax:tool_call>",
        "deepseek_v3": "<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json'",
    }
    for name, template in templates.items():
        assert tool_parser_class("auto", template).name == name
    assert tool_parser_class("auto", "{{ messages }}") is None
    assert tool_parser_class("qwen25", None).name == "hermes"
    with pytest.raises(ValueError, match="not known"):
        tool_parser_class("nope", None)
