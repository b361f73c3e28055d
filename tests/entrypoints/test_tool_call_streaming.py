"""Streaming tool calls, format by format, on model texts in each family's format (written after the families'
chat templates: reasoning first where the model reasons, strings with escapes, newlines and non-ASCII characters,
nested arguments, several calls): split into random token-size pieces, the streamed deltas must add up to exactly
the non-streamed message; each call's first delta carries its id and name and its arguments follow in several
fragments as they are written (not in one piece at the call's end); each piece of text is read once (the readers'
unread text stays as short as a marker, however long a call's arguments); and ``tool_choice: "required"`` / a
named function report a call only once its JSON is whole."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from server.entrypoints.chat_output import ChatOutput, ChatOutputConfig, finish_reason
from server.entrypoints.reasoning_parsers import reasoning_parser_class
from server.entrypoints.tool_parsers import TOOL_PARSERS, tool_parser_class

NOTE = {"type": "function", "function": {"name": "write_note", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"}, "text": {"type": "string"},
                                     "tags": {"type": "array", "items": {"type": "string"}},
                                     "pinned": {"type": "boolean"}}, "required": ["path", "text"]}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
TOOLS = [NOTE, WEATHER]
BODY = 'line 1\nline "2" \u00e9t\u00e9 {braces} [x] \\ back'
NOTE_ARGS = {"path": "notes/a.md", "text": BODY, "tags": ["x", "y"], "pinned": True}
SAO = {"city": "S\u00e3o Paulo", "days": 2}
THINK = "The user wants a note written and the weather in S\u00e3o Paulo.\nI will call both tools."
NOTE_JSON = json.dumps(NOTE_ARGS)
SAO_JSON = json.dumps(SAO, ensure_ascii=False)

# (tool parser, reasoning parser, starts in reasoning, text, reasoning, content, calls [(name, arguments)])
RECORDED = [
    ("hermes", "qwen3", False,
     f"<think>\n{THINK}\n</think>\n\n<tool_call>\n{{\"name\": \"write_note\", \"arguments\": {NOTE_JSON}}}\n"
     f"</tool_call>\n<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {SAO_JSON}}}\n</tool_call>",
     f"\n{THINK}\n", "\n", [("write_note", NOTE_ARGS), ("get_weather", SAO)]),
    ("hermes", None, False,  # arguments before the name, and arguments given as a JSON string
     f"Sure.<tool_call>{{\"arguments\": {SAO_JSON}, \"name\": \"get_weather\"}}</tool_call><tool_call>"
     f"{{\"name\": \"write_note\", \"arguments\": {json.dumps(NOTE_JSON)}}}</tool_call>",
     "", "Sure.", [("get_weather", SAO), ("write_note", NOTE_ARGS)]),
    ("qwen3_coder", None, False,
     f"I'll save it.\n<tool_call>\n<function=write_note>\n<parameter=path>\nnotes/a.md\n</parameter>\n<parameter=text>"
     f"\n{BODY}\n</parameter>\n<parameter=tags>\n[\"x\", \"y\"]\n</parameter>\n<parameter=pinned>\ntrue\n</parameter>\n"
     "</function>\n</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nS\u00e3o Paulo\n</parameter>\n"
     "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>",
     "", "I'll save it.\n\n", [("write_note", NOTE_ARGS), ("get_weather", SAO)]),
    ("glm45", "glm45", False,
     f"<think>{THINK}</think>\n<tool_call>write_note\n<arg_key>path</arg_key>\n<arg_value>notes/a.md</arg_value>\n"
     f"<arg_key>text</arg_key>\n<arg_value>{BODY}</arg_value>\n<arg_key>tags</arg_key>\n<arg_value>[\"x\", \"y\"]"
     "</arg_value>\n<arg_key>pinned</arg_key>\n<arg_value>true</arg_value>\n</tool_call>\n<tool_call>get_weather\n"
     "<arg_key>city</arg_key>\n<arg_value>S\u00e3o Paulo</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2"
     "</arg_value>\n</tool_call>",
     THINK, "\n", [("write_note", NOTE_ARGS), ("get_weather", SAO)]),
    ("minimax_m2", "minimax-m2", True,
     f"{THINK}\n</think>\n\n<minimax:tool_call>\n<invoke name=\"write_note\">\n<parameter name=\"path\">notes/a.md"
     f"</parameter>\n<parameter name=\"text\">{BODY}</parameter>\n<parameter name=\"tags\">[\"x\", \"y\"]</parameter>"
     "\n<parameter name=\"pinned\">true</parameter>\n</invoke>\n<invoke name=\"get_weather\">\n<parameter name=\"city"
     "\">S\u00e3o Paulo</parameter>\n<parameter name=\"days\">2</parameter>\n</invoke>\n</minimax:tool_call>",
     f"{THINK}\n", "", [("write_note", NOTE_ARGS), ("get_weather", SAO)]),
    ("deepseek_v3", "deepseek-r1", True,
     f"{THINK}</think>\n\nOne moment.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>write_note\n"
     f"```json\n{NOTE_JSON}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{SAO_JSON}\n"
     "```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>",
     THINK, "One moment.", [("write_note", NOTE_ARGS), ("get_weather", SAO)]),
    ("deepseek_v31", "deepseek-v3", True,
     f"{THINK}</think><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>write_note<｜tool▁sep｜>{NOTE_JSON}<｜tool▁call▁end｜>"
     f"<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{SAO_JSON}<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>",
     THINK, "", [("write_note", NOTE_ARGS), ("get_weather", SAO)]),
    ("kimi_k2", "kimi_k2", False,
     f"<think>{THINK}</think>Writing it.<|tool_calls_section_begin|><|tool_call_begin|>functions.write_note:0"
     f"<|tool_call_argument_begin|>{NOTE_JSON}<|tool_call_end|><|tool_call_begin|>functions.get_weather:1"
     f"<|tool_call_argument_begin|>{SAO_JSON}<|tool_call_end|><|tool_calls_section_end|>",
     THINK, "Writing it.", [("write_note", NOTE_ARGS), ("get_weather", SAO)]),
    ("gpt-oss", "gpt-oss", False,
     f"<|channel|>analysis<|message|>{THINK}<|end|><|start|>assistant<|channel|>commentary to=functions.write_note "
     f"<|constrain|>json<|message|>{json.dumps(NOTE_ARGS, separators=(',', ':'))}<|call|>",
     THINK, "", [("write_note", NOTE_ARGS)]),
    ("gpt-oss", "gpt-oss", False,
     f"<|channel|>analysis<|message|>{THINK}<|end|><|start|>assistant<|channel|>final<|message|>It is 31 C in "
     "S\u00e3o Paulo.<|return|>", THINK, "It is 31 C in S\u00e3o Paulo.", []),
    ("llama3_json", None, False,
     f"<|python_tag|>{{\"name\": \"write_note\", \"parameters\": {NOTE_JSON}}}; {{\"name\": \"get_weather\", "
     f"\"parameters\": {SAO_JSON}}}", "", "", [("write_note", NOTE_ARGS), ("get_weather", SAO)]),
    ("llama3_json", None, False, '{"answer": 42} is the JSON you asked for.', "",
     '{"answer": 42} is the JSON you asked for.', []),
]
CONTROL = ("<｜end▁of▁sentence｜>", "<|return|>", "<|end|>")


def config(parser: str | None, reasoning: str | None, in_reasoning: bool, **kw) -> ChatOutputConfig:
    r = reasoning_parser_class(reasoning)() if reasoning else None
    content = tool_parser_class(r.content_tool_parser, None)(None) if r and r.content_tool_parser else None
    return ChatOutputConfig(reasoning=r, in_reasoning=in_reasoning, may_reason=r is not None,
                            tools=tool_parser_class(parser, None)(TOOLS) if parser else None,
                            content_parser=content, control_tokens=CONTROL, **{"mode": "auto", **kw})


def token_pieces(text: str, rng: random.Random) -> list[str]:
    """``text`` cut where a tokenizer might cut it: pieces of 1 to 8 characters, some inside the markers."""
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(1, 8)
        pieces.append(text[i:i + n])
        i += n
    return pieces


def stream_message(cfg: ChatOutputConfig, pieces: list[str]) -> tuple[dict, list[dict]]:
    """The message the deltas of ``pieces`` add up to, in the non-streamed message's shape, and the deltas."""
    out = ChatOutput(cfg)
    reasoning, content, calls, deltas = "", "", [], []
    for k, piece in enumerate(pieces):
        delta = out.delta(piece, final=k == len(pieces) - 1)
        deltas.append(delta)
        assert delta.get("reasoning_content") == delta.get("reasoning")
        reasoning += delta.get("reasoning_content", "")
        content += delta.get("content", "")
        for tc in delta.get("tool_calls", []):
            if tc["index"] == len(calls):  # a call's first delta: its id, type and name
                assert tc["id"] and tc["type"] == "function" and tc["function"]["name"]
                calls.append({"id": tc["id"], "type": "function",
                              "function": {"name": tc["function"]["name"], "arguments": ""}})
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
            calls[tc["index"]]["function"]["arguments"] += tc["function"]["arguments"]
    msg = {"role": "assistant", "content": content if content or not calls else None}
    if cfg.reasoning is not None:
        msg["reasoning_content"] = msg["reasoning"] = reasoning or None
    if calls:
        msg["tool_calls"] = calls
    return msg, deltas


def without_ids(msg: dict) -> dict:
    return {**msg, "tool_calls": [{**c, "id": None} for c in msg.get("tool_calls", [])]}


def test_every_format_has_a_recorded_text():
    assert {case[0] for case in RECORDED} == set(TOOL_PARSERS)


@pytest.mark.parametrize(("parser", "reasoning", "in_reasoning", "text", "thought", "content", "calls"), RECORDED)
def test_recorded_texts_whole_and_in_random_pieces(parser, reasoning, in_reasoning, text, thought, content, calls):
    cfg = config(parser, reasoning, in_reasoning)
    whole = ChatOutput(cfg).message(text)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole.get("tool_calls", [])] \
        == calls
    assert (whole["content"] or "") == content
    if reasoning:
        assert (whole["reasoning_content"] or "") == thought
    for seed in range(40):
        streamed, _ = stream_message(cfg, token_pieces(text, random.Random(seed)))
        assert without_ids(streamed) == without_ids(whole), seed
    char_by_char, _ = stream_message(cfg, list(text))
    assert without_ids(char_by_char) == without_ids(whole)


@pytest.mark.parametrize("case", list({c[0]: c for c in reversed(RECORDED) if c[6]}.values()), ids=lambda c: c[0])
def test_arguments_stream_as_they_are_written(case):
    """OpenAI's order: a call's id and name first, then its arguments in fragments while the model writes them
    (the first text of each format with calls; its name comes before its arguments)."""
    parser, reasoning, in_reasoning, text = case[:4]
    _, deltas = stream_message(config(parser, reasoning, in_reasoning), token_pieces(text, random.Random(0)))
    first = [tc for d in deltas for tc in d.get("tool_calls", []) if tc["index"] == 0]
    assert "name" in first[0]["function"] and all("name" not in tc["function"] for tc in first[1:])
    fragments = [tc["function"]["arguments"] for tc in first if tc["function"]["arguments"]]
    assert len(fragments) >= 5, fragments
    whole_args = "".join(fragments)
    assert all(not _parses("".join(fragments[:k])) for k in range(1, len(fragments) - 1)), whole_args


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


LONG = "word " * 4000  # 20000 characters of one string argument
LONG_TEXTS = {
    "hermes": f'<tool_call>{{"name": "write_note", "arguments": {{"path": "a", "text": "{LONG}"}}}}</tool_call>',
    "qwen3_coder": f"<tool_call>\n<function=write_note>\n<parameter=text>\n{LONG}\n</parameter>\n</function>\n"
                   "</tool_call>",
    "glm45": f"<tool_call>write_note\n<arg_key>text</arg_key>\n<arg_value>{LONG}</arg_value>\n</tool_call>",
    "minimax_m2": f'<minimax:tool_call>\n<invoke name="write_note">\n<parameter name="text">{LONG}</parameter>\n'
                  "</invoke>\n</minimax:tool_call>",
    "deepseek_v3": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>write_note\n```json\n"
                   f'{{"text": "{LONG}"}}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
    "deepseek_v31": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>write_note<｜tool▁sep｜>"
                    f'{{"text": "{LONG}"}}<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
    "kimi_k2": f'<|tool_calls_section_begin|><|tool_call_begin|>functions.write_note:0<|tool_call_argument_begin|>'
               f'{{"text": "{LONG}"}}<|tool_call_end|><|tool_calls_section_end|>',
    "gpt-oss": "<|channel|>commentary to=functions.write_note <|constrain|>json<|message|>"
               f'{{"text": "{LONG}"}}<|call|>',
    "llama3_json": f'{{"name": "write_note", "parameters": {{"text": "{LONG}"}}}}',
}


@pytest.mark.parametrize("parser", sorted(LONG_TEXTS))
def test_each_piece_is_read_once(parser):
    """A 20000-character argument streamed a character at a time: the reader's unread text never grows past a
    marker's length (nothing is read again), and the stream takes about as long as reading the text once."""
    assert set(LONG_TEXTS) == set(TOOL_PARSERS)
    text = LONG_TEXTS[parser]
    reader = tool_parser_class(parser, None)(TOOLS)
    longest, args, start = 0, "", time.perf_counter()
    for k, ch in enumerate(text):
        d = reader.feed(ch, final=k == len(text) - 1)
        args += "".join(c.arguments for c in d.calls)
        longest = max(longest, len(reader.buf))
    elapsed = time.perf_counter() - start
    assert longest <= 32, longest
    assert json.loads(args)["text"] == LONG
    assert elapsed < 5.0, elapsed  # re-reading the text at each character would take minutes


# ---- tool_choice "required" and a named function --------------------------------------------------------------

REQUIRED = [{"name": "write_note", "parameters": NOTE_ARGS}, {"name": "get_weather", "parameters": SAO}]


@pytest.mark.parametrize("mode", ["required", "named"])
def test_forced_calls_stream_and_are_reported_only_whole(mode):
    """The grammar's output (one line, json.dumps's separators) read back as calls: streamed in random pieces it
    adds up to the whole message; cut anywhere before its end (max_tokens, a stop string), the whole message has no
    call and the finish reason is not ``tool_calls``."""
    kw = {"mode": mode, "function": "write_note" if mode == "named" else None}
    cfg = config(None, None, False, **kw)
    text = json.dumps(REQUIRED if mode == "required" else NOTE_ARGS, ensure_ascii=False)
    whole = ChatOutput(cfg).message(text)
    expected = REQUIRED if mode == "required" else [{"name": "write_note", "parameters": NOTE_ARGS}]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole["tool_calls"]] == [
        (c["name"], c["parameters"]) for c in expected]
    assert whole["content"] == ""
    for seed in range(40):
        streamed, _ = stream_message(cfg, token_pieces(text, random.Random(seed)))
        assert without_ids(streamed) == {**without_ids(whole), "content": None}, seed
    rng = random.Random(1)
    for cut in sorted(rng.sample(range(1, len(text)), 30)):
        out = ChatOutput(cfg)
        msg = out.message(text[:cut])
        assert "tool_calls" not in msg and msg["content"] == "", cut
        assert finish_reason("length", out.has_calls) == "length" and finish_reason("stop", out.has_calls) == "stop"
    out = ChatOutput(cfg)
    out.message(text)
    assert finish_reason("stop", out.has_calls) == "tool_calls"


def test_parallel_tool_calls_false_streams_the_first_call_only():
    cfg = config("hermes", "qwen3", False, single_call=True)
    text = RECORDED[0][3]
    whole = ChatOutput(cfg).message(text)
    assert [c["function"]["name"] for c in whole["tool_calls"]] == ["write_note"]
    streamed, _ = stream_message(cfg, token_pieces(text, random.Random(3)))
    assert without_ids(streamed) == without_ids(whole)


# pieces of every format's marks and of JSON, for texts no model writes: the readers must agree with themselves
ALPHABET = ["<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=", "</parameter>", "<arg_key>",
            "</arg_key>", "<arg_value>", "</arg_value>", "<minimax:tool_call>", "</minimax:tool_call>",
            '<invoke name="', "</invoke>", '<parameter name="', '">', "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
            "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "```json", "```",
            "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>", "<|tool_call_end|>",
            "<|tool_call_argument_begin|>", "functions.get_weather:0", "<|channel|>", "<|message|>", "<|end|>",
            "<|call|>", "<|start|>", "commentary to=functions.write_note ", "analysis", "final", "<|python_tag|>",
            "<think>", "</think>", '{"name": "get_weather", ', '"arguments": ', '"parameters": ', '{"city": "',
            "Paris", '"', "{", "}", "[", "]", ",", ":", ";", "\\", "\n", " ", "3", "true", "write_note", ">", "<"]


@pytest.mark.parametrize("parser", sorted(TOOL_PARSERS))
@pytest.mark.parametrize("mode", ["auto", "required", "named"])
def test_any_text_streams_to_its_whole_message(parser, mode):
    """Random texts of marks and JSON pieces, in random pieces: no reader fails, and the deltas add up to the whole
    message (the readers do not depend on where the text was cut)."""
    rng = random.Random(f"{parser}-{mode}")
    reasoning = {"gpt-oss": "gpt-oss", "minimax_m2": "minimax-m2", "hermes": "qwen3"}.get(parser)
    cfg = config(parser, reasoning, parser == "minimax_m2", mode=mode, function="write_note")
    for _ in range(60):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 40)))
        whole = ChatOutput(cfg).message(text)
        streamed, _ = stream_message(cfg, token_pieces(text, rng))
        if mode != "auto":  # a forced call is reported only whole; its stream has sent what was written
            if "tool_calls" in whole:
                assert without_ids(streamed)["tool_calls"] == without_ids(whole)["tool_calls"], text
            continue
        assert without_ids(streamed) == without_ids(whole), text


# the families' chat templates (tests/data/chat_templates) render an assistant turn as the model is trained to write
# it; read back, it must give the calls it was rendered from: (template, tool parser, reasoning parser, starts in it)
TEMPLATES = [("qwen3", "hermes", "qwen3", False), ("qwen3_coder", "qwen3_coder", None, False),
             ("glm4_moe", "glm45", "glm45", False), ("minimax_m2", "minimax_m2", "minimax-m2", True)]


@pytest.mark.parametrize(("family", "parser", "reasoning", "in_reasoning"), TEMPLATES, ids=[t[0] for t in TEMPLATES])
def test_turns_rendered_by_the_chat_templates_read_back(family, parser, reasoning, in_reasoning):
    from server.models.builtin import builtin_model_path
    from server.tokenizer import Tokenizer

    template = (Path(__file__).parent.parent / "data" / "chat_templates" / f"{family}.jinja").read_text()
    tok = Tokenizer.from_pretrained(builtin_model_path())
    calls = [("write_note", NOTE_ARGS), ("get_weather", SAO)]
    turn = {"role": "assistant", "content": "Sure.", "reasoning_content": "Think first.", "tool_calls": [
        {"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
        for i, (n, a) in enumerate(calls)]}
    user = [{"role": "user", "content": "Save a note and check the weather."}]
    prompt = tok.apply_chat_template(user, chat_template=template, tools=TOOLS)
    full = tok.apply_chat_template([*user, turn], chat_template=template, add_generation_prompt=False, tools=TOOLS)
    assert full.startswith(prompt)
    text = full[len(prompt):].split("<|im_end|>")[0].split("[e~[")[0]  # the turn, without its end token
    cfg = config(parser, reasoning, in_reasoning)
    whole = ChatOutput(cfg).message(text)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole["tool_calls"]] == calls
    assert whole["content"].strip() == "Sure."
    if reasoning:
        assert whole["reasoning_content"].strip() == "Think first."
    for seed in range(20):
        streamed, _ = stream_message(cfg, token_pieces(text, random.Random(seed)))
        assert without_ids(streamed) == without_ids(whole), seed
