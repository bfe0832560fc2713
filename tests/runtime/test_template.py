"""Hard-prompt templates: parsing errors, and token-space encoding against the real tokenizers."""

import pytest

from checkpoints import bert_tokenizer, roberta_tokenizer
from ptbundle.runtime.template import Template, TemplateError
from ptbundle.runtime.text import encode


def tokenizer(kind, max_length=128):
    tok = bert_tokenizer() if kind == "bert" else roberta_tokenizer()
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


@pytest.mark.parametrize("source, pair, message", [
    ("It was", False, r"has no \{text\} slot"),
    ("{text} {label}", False, r"unknown slot \{label\}"),
    ("{}", False, r"unknown slot \{\}"),
    ("{0} {text}", False, r"unknown slot \{0\}"),
    ("{text} {", False, r"Single '\{'"),
    ("{text} }", False, r"Single '\}'"),
    ("{text!r}", False, "no format spec or conversion"),
    ("{text:>10}", False, "no format spec or conversion"),
    ("{text} {text}", False, r"\{text\} appears twice"),
    ("{text} {text_b}", False, r"\{text_b\} is for sentence pairs"),
    ("{text} and more", True, r"needs a \{text_b\} slot"),
    ("{text_b} {text}", True, r"\{text\} must come before \{text_b\}"),
])
def test_bad_templates_are_refused_with_the_reason(source, pair, message):
    with pytest.raises(TemplateError, match=message):
        Template.parse(source, pair=pair)


def test_literal_braces_are_escaped_by_doubling():
    t = Template.parse("{{note}} {text}")
    assert t.format("x") == "{note} x"


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("source", ["Review: {text} It was", "{text} It was", "the movie : {text}", "{text}"])
def test_token_space_equals_the_tokenizer_on_the_formatted_text(kind, source):
    """Away from truncation, the template in token space is exactly the formatted string tokenized."""
    tok = tokenizer(kind)
    template = Template.parse(source)
    texts = ["a great movie", "the worst film ever, really", "not so good!"]
    got = encode(tok, texts, template=template)
    want = tok.encode_batch([template.format(t) for t in texts])
    assert [e.ids for e in got] == [e.ids for e in want]
    assert [e.type_ids for e in got] == [e.type_ids for e in want]


def test_truncation_shortens_the_text_never_the_template():
    tok = tokenizer("bert", max_length=10)
    template = Template.parse("the movie , {text} it was")
    long = " ".join(["good"] * 30)
    e = encode(tok, [long], template=template)[0]
    assert len(e.ids) == 10
    assert e.tokens[:4] == ["[CLS]", "the", "movie", ","]
    assert e.tokens[-3:] == ["it", "was", "[SEP]"]  # plain truncation would have cut these
    assert e.tokens[4:7] == ["good"] * 3


def test_a_template_that_leaves_no_room_is_an_error():
    tok = tokenizer("bert", max_length=8)
    with pytest.raises(TemplateError, match="no room for the text"):
        encode(tok, ["good"], template=Template.parse("the movie is a great film {text} it was"))


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_pair_template_segments_and_special_tokens(kind):
    tok = tokenizer(kind)
    template = Template.parse("{text} ? {text_b}", pair=True)
    got = encode(tok, ["is it a good movie"], ["so it is"], template=template)[0]
    # segment A is everything before {text_b}; the tokenizer's own pair processing joins them
    want = tok.encode("is it a good movie ?", " so it is" if kind == "roberta" else "so it is")
    assert got.ids == want.ids and got.type_ids == want.type_ids
    if kind == "bert":
        assert got.tokens == ["[CLS]", "is", "it", "a", "good", "movie", "?", "[SEP]", "so", "it", "is", "[SEP]"]
        assert got.type_ids == [0] * 8 + [1] * 4


def test_pair_truncation_is_longest_first():
    tok = tokenizer("bert", max_length=12)
    template = Template.parse("{text} ? {text_b}", pair=True)
    e = encode(tok, [" ".join(["good"] * 20)], ["bad bad"], template=template)[0]
    assert len(e.ids) == 12
    assert e.tokens.count("bad") == 2  # the short text is kept whole
    assert e.tokens.count("good") == 12 - 4 - 2  # [CLS] ? [SEP] [SEP] and the two "bad"


def test_one_text_for_a_pair_template_is_an_error():
    with pytest.raises(TemplateError, match="two texts"):
        encode(tokenizer("bert"), ["a"], template=Template.parse("{text} {text_b}", pair=True))
