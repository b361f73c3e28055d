"""Tokenizer and IncrementalDetokenizer against transformers' tokenizer and one-shot decoding.

Two tokenizer directories: the built-in model's byte-level BPE (GPT-2 / Qwen style, ChatML template) and a
SentencePiece-style BPE built here (Metaspace pre-tokenizer, byte-fallback tokens, a decoder that strips the
leading space, BOS added by the post-processor, AddedToken dicts and a chat_template.jinja file: Llama-2
style).
"""

import json
import os
import random
import shutil

import jinja2
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from server.models.builtin import builtin_model_path, training_text
from server.tokenizer import IncrementalDetokenizer, Tokenizer

SP_SPECIALS = ["<unk>", "<s>", "</s>"]

SP_CHAT_TEMPLATE = """\
{% if messages[0]['role'] == 'system' %}
{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}
{% else %}
{% set system = none %}{% set turns = messages %}
{% endif %}
{% if tools %}{{ bos_token }}[TOOLS] {{ tools | tojson }}{% endif %}
{% for message in turns %}
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{ raise_exception('roles must alternate user/assistant') }}
{% endif %}
{% if loop.first and system %}{% set content = '<<SYS>> ' + system + ' <</SYS>> ' + message['content'] %}
{% else %}{% set content = message['content'] %}{% endif %}
{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}
{% else %}{{ ' ' + content | trim + ' ' + eos_token }}{% endif %}
{% endfor %}
"""

TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "The river town, 1984: 42 apples and 7.5 kg of beans!",
    "你好，世界",
    "emoji 😀👍🏽 and café naïve",
    "line one\nline two\n\n\ttabbed",
    "special text <|im_end|> and <s> inside </s>",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello, who are you?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the river called? 你好"},
        {"role": "assistant", "content": "  It has no name. "},
        {"role": "user", "content": "Why not? 😀"},
    ],
]


def _write_sentencepiece_style(directory: str) -> None:
    """A Llama-2-like tokenizer: byte tokens <0x00>..<0xFF> right after the specials, Metaspace words."""
    tok = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SP_SPECIALS, show_progress=False)
    tok.train_from_iterator(training_text(seed=7, n_sentences=500), trainer)
    spec = json.loads(tok.to_str())
    trained = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {token: i for i, token in enumerate(SP_SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(SP_SPECIALS) + b for b in range(256)})
    for token, _ in trained:
        vocab.setdefault(token, len(vocab))
    spec["model"]["vocab"] = vocab
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.save(os.path.join(directory, "tokenizer.json"))

    def added(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "rstrip": False,
                "normalized": False, "single_word": False, "special": True}  # fmt: skip

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": added("<s>"),
        "eos_token": added("</s>"),
        "unk_token": "<unk>",
        "add_bos_token": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(directory, "chat_template.jinja"), "w") as f:
        f.write(SP_CHAT_TEMPLATE)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, 5]}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"eos_token_id": 7}, f)


@pytest.fixture(scope="module")
def bytelevel_dir(tmp_path_factory) -> str:
    return builtin_model_path(str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("sp_tokenizer"))
    _write_sentencepiece_style(directory)
    return directory


@pytest.fixture(params=["bytelevel", "sentencepiece"])
def tok_dir(request, bytelevel_dir, sp_dir) -> str:
    return bytelevel_dir if request.param == "bytelevel" else sp_dir


# ---------------------------------------------------------------- Tokenizer vs transformers


def test_encode_matches_transformers(tok_dir):
    ours, ref = Tokenizer.from_pretrained(tok_dir), AutoTokenizer.from_pretrained(tok_dir)
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == ref.encode(text, add_special_tokens=special)


def test_decode_matches_transformers(tok_dir):
    ours, ref = Tokenizer.from_pretrained(tok_dir), AutoTokenizer.from_pretrained(tok_dir)
    rng = random.Random(0)
    id_lists = [ref.encode(text) for text in TEXTS]
    id_lists += [[rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 40))] for _ in range(50)]
    for ids in id_lists:
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_chat_template_matches_transformers(tok_dir):
    ours, ref = Tokenizer.from_pretrained(tok_dir), AutoTokenizer.from_pretrained(tok_dir)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected
    tools = [{"name": "get_tide", "description": "Tide table for a harbour (café)", "parameters": {}}]
    expected = ref.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True, tools=tools)
    assert ours.apply_chat_template(CONVERSATIONS[0], tools=tools) == expected


def test_content_parts_are_flattened(bytelevel_dir):
    ours, ref = Tokenizer.from_pretrained(bytelevel_dir), AutoTokenizer.from_pretrained(bytelevel_dir)
    parts = [{"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}]
    joined = [{"role": "user", "content": "first\nsecond"}]
    expected = ref.apply_chat_template(joined, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(parts) == expected
    with pytest.raises(ValueError, match="image_url"):
        ours.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])


def test_template_raise_exception(sp_dir):
    ours = Tokenizer.from_pretrained(sp_dir)
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        ours.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_attributes(bytelevel_dir, sp_dir):
    byte_level = Tokenizer.from_pretrained(bytelevel_dir)
    ref = AutoTokenizer.from_pretrained(bytelevel_dir)
    im_end, endoftext = byte_level.token_to_id("<|im_end|>"), byte_level.token_to_id("<|endoftext|>")
    assert byte_level.eos_token_ids == [im_end, endoftext]
    assert byte_level.bos_token_id is None
    assert byte_level.vocab_size == len(ref) == 2048
    assert byte_level.id_to_token(im_end) == "<|im_end|>"
    assert byte_level.has_chat_template
    assert byte_level.model_max_length == 8192

    sp = Tokenizer.from_pretrained(sp_dir)
    # tokenizer_config eos (2), then generation_config [2, 5], then config.json 7, without repeats.
    assert sp.eos_token_ids == [2, 5, 7]
    assert sp.bos_token_id == 1 and sp.bos_token == "<s>"
    assert sp.has_chat_template


def test_add_bos_token_without_post_processor(sp_dir, tmp_path):
    with open(os.path.join(sp_dir, "tokenizer.json")) as f:
        spec = json.load(f)
    spec["post_processor"] = None
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(os.path.join(sp_dir, name), tmp_path / name)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    without_post, with_post = Tokenizer.from_pretrained(str(tmp_path)), Tokenizer.from_pretrained(sp_dir)
    for text in TEXTS:
        ids = without_post.encode(text)
        assert ids[0] == 1 and ids[1:2] != [1]
        assert ids == with_post.encode(text)
        assert without_post.encode(text, add_special_tokens=False) == ids[1:]


def test_missing_files_raise(sp_dir, tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path))
    shutil.copy(os.path.join(sp_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
    tok = Tokenizer.from_pretrained(str(tmp_path))
    assert not tok.has_chat_template and tok.eos_token_ids == [] and tok.bos_token_id is None
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="no chat template.*chat_template"):
        tok.apply_chat_template(messages)
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    assert tok.apply_chat_template(messages, chat_template=template) == "<user>hi"
    (tmp_path / "t.jinja").write_text(template)
    assert Tokenizer.from_pretrained(str(tmp_path), chat_template=str(tmp_path / "t.jinja")).has_chat_template


# ---------------------------------------------------------------- IncrementalDetokenizer


def _stream(tok: Tokenizer, ids: list[int], rng: random.Random, **kwargs) -> tuple[IncrementalDetokenizer, str]:
    """Feed `ids` in random chunks of 1..4 tokens, then flush; return the detokenizer and all its output."""
    det = IncrementalDetokenizer(tok, **kwargs)
    out, i = "", 0
    while i < len(ids):
        n = rng.randrange(1, 5)
        out += det.add(ids[i : i + n])
        i += n
    out += det.flush()
    assert det.text == out
    return det, out


def test_incremental_equals_full_decode_random_ids(bytelevel_dir):
    tok = Tokenizer.from_pretrained(bytelevel_dir)
    rng = random.Random(1)
    for _ in range(400):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            assert _stream(tok, ids, rng, skip_special_tokens=skip)[1] == tok.decode(ids, skip)


def test_incremental_equals_full_decode_byte_fallback(sp_dir):
    # Random tokens, with byte tokens only in runs that form whole UTF-8 characters (see the class docstring).
    tok = Tokenizer.from_pretrained(sp_dir)
    rng = random.Random(2)
    word_ids = list(range(3 + 256, tok.vocab_size)) + [0, 1, 2]
    chars = "é你好😀👍🏽ß€"
    for _ in range(300):
        ids = []
        while len(ids) < 30:
            if rng.random() < 0.2:
                ids += [3 + b for b in rng.choice(chars).encode()]
            else:
                ids.append(rng.choice(word_ids))
        for skip in (True, False):
            assert _stream(tok, ids, rng, skip_special_tokens=skip)[1] == tok.decode(ids, skip)


def test_multibyte_characters_split_across_tokens(tok_dir):
    tok = Tokenizer.from_pretrained(tok_dir)
    text = "river 你好 😀👍🏽 café"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split()) * 3  # the CJK and emoji really are split into byte tokens
    det = IncrementalDetokenizer(tok)
    for i in range(len(ids)):
        piece = det.add(ids[i : i + 1])
        assert "\ufffd" not in piece
        # Released: all of the prefix's characters once they are complete, never a partial one. (A byte-fallback
        # decode of a prefix turns the whole run of byte tokens into U+FFFD while its last character is
        # unfinished, so there the released text may be longer than the prefix's decode.)
        prefix = tok.decode(ids[: i + 1])
        assert text.startswith(det.text) and det.text.startswith(prefix.rstrip("\ufffd"))
        if "\ufffd" not in prefix:
            assert det.text == prefix
    assert det.flush() == "" and det.text == text


def _check_stop(tok: Tokenizer, text: str, stop: list[str], expected: str, matched: str | None) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, stop=stop)
    for i in range(len(ids)):
        det.add(ids[i : i + 1])
        assert expected.startswith(det.text)
        assert not any(s and s in det.text for s in stop)
    if matched is not None:  # tokens after a stop are ignored
        assert det.add(ids[:3]) == "" and det.flush() == ""
    det.flush()
    assert (det.text, det.matched_stop, det.stopped) == (expected, matched, matched is not None)


def test_stop_strings_spanning_token_boundaries(tok_dir):
    tok = Tokenizer.from_pretrained(tok_dir)
    text = "The quiet river crossed the market square. Then the ferry arrived 你好 at noon."
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.decode(ids[:i]) for i in range(len(ids) + 1)]
    boundaries = [len(p) for p in pieces[1:-1] if "\ufffd" not in p]
    assert len(boundaries) > 10
    for b in boundaries:
        for left, right in ((1, 1), (2, 3), (4, 2)):
            stop = text[max(b - left, 0) : b + right]
            _check_stop(tok, text, [stop], text[: text.find(stop)], stop)


def test_stop_cases(tok_dir):
    tok = Tokenizer.from_pretrained(tok_dir)
    text = "hello world, hello river"
    _check_stop(tok, text, ["hel"], "", "hel")  # at the very start
    _check_stop(tok, text, ["zzz"], text, None)  # no stop
    _check_stop(tok, text, ["river", "lo w"], "hel", "lo w")  # the earliest match wins
    _check_stop(tok, text, ["d, h"], "hello worl", "d, h")
    _check_stop(tok, "rivers 你好世界", ["好世"], "rivers 你", "好世")
    _check_stop(tok, text, ["", "river"], "hello world, hello ", "river")  # empty strings are ignored


def test_held_back_prefix_is_flushed(tok_dir):
    tok = Tokenizer.from_pretrained(tok_dir)
    text = "the market square"
    ids = tok.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, stop=["squares", "rex"])
    released = "".join(det.add([i]) for i in ids)
    # "square" could still become "squares", so it is held back until the request ends.
    assert released == "the market " and not det.stopped
    assert det.flush() == "square" and det.text == text and det.matched_stop is None


def _metaspace_nfkc_tokenizer() -> Tokenizer:
    """A SentencePiece-style BPE (Metaspace '▁' for spaces, byte fallback) behind an NFKC normalizer, which can
    shrink text (a 3-byte full-width letter becomes 1 byte) before it is split."""
    from tokenizers import normalizers

    backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>"],
                                  initial_alphabet=[f"<0x{b:02X}>" for b in range(256)])
    backend.train_from_iterator(training_text(0, 500), trainer)
    return Tokenizer(backend)


@pytest.mark.parametrize("which", ["builtin", "metaspace_nfkc"])
def test_byte_length_bounds_the_token_count_from_below(which):
    """``max_token_bytes`` is what the server's refusal of over-long prompts rests on: for every text, its UTF-8
    length over it never exceeds the token count the tokenizers library gives, on the texts that pack bytes into
    tokens hardest (runs of the longest token, of spaces, of multi-byte characters)."""
    tok = Tokenizer.from_pretrained(builtin_model_path()) if which == "builtin" else _metaspace_nfkc_tokenizer()
    longest = max((tok.decode([i], skip_special_tokens=False) for i in range(tok.vocab_size)), key=len)
    rng = random.Random(0)
    prose = " ".join(training_text(1, 500))
    words = prose.split()
    texts = [longest * 50, " " * 5000, "\n" * 3000, "0" * 4000, "éèê" * 1000, "日本語の文章" * 500, "🙂" * 800,
             "ＡＢＣＤ" * 700, "ﬃ" * 900, " ".join(rng.choice(words) for _ in range(3000)), prose[:30000]]
    for text in texts:
        n_tokens = len(tok.encode(text, add_special_tokens=False))
        assert len(text.encode()) / tok.max_token_bytes <= n_tokens, (text[:20], n_tokens, tok.max_token_bytes)


# ---------------------------------------------------------------- chat templates of the MoE families

TEMPLATES = os.path.join(os.path.dirname(__file__), "data", "chat_templates")
TIDE_TOOL = {"type": "function", "function": {
    "name": "get_tide", "description": "Tide table for a harbour (café)",
    "parameters": {"type": "object", "properties": {
        "harbour": {"type": "string", "description": "its name"},
        "days": {"type": "integer", "enum": [1, 2, 3]}}, "required": ["harbour"]}}}


def agent_conversation(arguments_as_text: bool) -> list[dict]:
    """A tool-using turn as an OpenAI client sends it (``arguments`` a JSON string) or as transformers' templates are
    rendered in its own docs (a mapping): system, user, an assistant turn with reasoning and two calls, their two
    results, the answer, a follow-up question."""
    args = [{"harbour": "Kiel", "days": 2}, {"harbour": "Hörnum", "options": {"units": "m"}}]
    calls = [{"id": f"call_{i}", "type": "function",
              "function": {"name": "get_tide", "arguments": json.dumps(a, ensure_ascii=False) if arguments_as_text
                           else a}} for i, a in enumerate(args)]
    return [
        {"role": "system", "content": "You answer sailors."},
        {"role": "user", "content": "When is high water in Kiel and Hörnum?"},
        {"role": "assistant", "content": "", "reasoning_content": "Two harbours: two calls.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_0", "content": "14:02"},
        {"role": "tool", "tool_call_id": "call_1", "content": "15:40"},
        {"role": "assistant", "content": "<think>Both known.</think>Kiel 14:02, Hörnum 15:40."},
        {"role": "user", "content": [{"type": "text", "text": "And tomorrow?"}]},
    ]


@pytest.mark.parametrize("family", ["qwen3", "qwen3_coder", "glm4_moe", "minimax_m2"])
def test_moe_family_chat_templates_render_as_transformers_does(bytelevel_dir, family):
    """Representative templates of Qwen3(-MoE), Qwen3-Coder, GLM-4.5 and MiniMax-M2, written from their published
    formats (tests/data/chat_templates), render as transformers renders them: tools, reasoning, tool calls whose
    arguments arrive as JSON text (the OpenAI form: the templates iterate over them as a mapping), tool results,
    content parts, and ``enable_thinking``."""
    with open(os.path.join(TEMPLATES, f"{family}.jinja"), encoding="utf-8") as f:
        template = f.read()
    ours, ref = Tokenizer.from_pretrained(bytelevel_dir), AutoTokenizer.from_pretrained(bytelevel_dir)
    ref_messages = agent_conversation(arguments_as_text=False)
    ref_messages[-1] = {"role": "user", "content": "And tomorrow?"}  # transformers passes content parts as they are
    for extra in ({"tools": [TIDE_TOOL]}, {"tools": [TIDE_TOOL], "enable_thinking": False}, {}):
        expected = ref.apply_chat_template(ref_messages, chat_template=template, tokenize=False,
                                           add_generation_prompt=True, **extra)
        got = ours.apply_chat_template(agent_conversation(arguments_as_text=True), chat_template=template, **extra)
        assert got == expected
    assert "Kiel" in got and '\\"harbour' not in got  # the arguments rendered as values, not as escaped JSON text
