"""The Python API's arguments, checked as pt-run and the server check theirs: a bare string is one text, and a
bad batch size, a text of the wrong type, an empty text or a lone surrogate is one InputError naming it.

Real bundles: `tiny_bundle` (built by the real pt-build) and a generation bundle by the builder's writer;
pt-run runs as a real process.
"""

import re

import numpy as np
import pytest

from helpers import assert_one_error_line, pt_run, write_chat_bundle
from ptbundle.runtime import Bundle
from ptbundle.runtime.errors import InputError


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return Bundle.load(tiny_bundle)


def test_a_bare_string_is_one_text(bundle):
    one = bundle.predict("a great movie")
    assert isinstance(one, list) and len(one) == 1
    assert one == bundle.predict(["a great movie"])
    assert bundle.logits("a dull mess").shape == (1, 2)
    np.testing.assert_array_equal(bundle.logits("a dull mess"), bundle.logits(["a dull mess"]))
    assert len(bundle.encode("a dull mess")) == 1


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True, "8", None])
def test_batch_size_must_be_a_positive_integer(bundle, batch_size):
    expected = f"batch_size must be a positive integer, not {batch_size!r}"
    for call in (bundle.predict, bundle.logits):
        with pytest.raises(InputError, match=f"^{re.escape(expected)}$"):
            call(["a great movie", "the worst film ever"], batch_size=batch_size)


def test_batch_sizes_still_batch(bundle):
    texts = ["a great movie", "the worst film ever", "a dull story", "the best script", "great"]
    whole = bundle.logits(texts)
    for batch_size in (1, 2, np.int64(3)):
        np.testing.assert_allclose(bundle.logits(texts, batch_size=batch_size), whole, atol=1e-5)


@pytest.mark.parametrize("texts, expected", [
    ([None], "texts[0] must be a string, not NoneType"),
    (["a great movie", 5], "texts[1] must be a string, not int"),
    ([b"x"], "texts[0] must be a string, not bytes"),
    ([""], "texts[0] is empty"),
    (["a great movie", "  \t"], "texts[1] is empty"),
    (["ok \ud83d"], "texts[0] holds a lone surrogate (U+D83D at character 4): not valid Unicode text"),
    (b"a great movie", "texts must be a string or a list of strings, not bytes"),
    (None, "texts must be a string or a list of strings, not NoneType"),
    (5, "texts must be a string or a list of strings, not int"),
], ids=["none", "int", "bytes", "empty", "blank", "surrogate", "bare-bytes", "bare-none", "bare-int"])
def test_a_bad_text_is_an_input_error_naming_it(bundle, texts, expected):
    for call in (bundle.predict, bundle.logits, bundle.encode):
        with pytest.raises(InputError) as e:
            call(texts)
        assert str(e.value) == expected


@pytest.mark.parametrize("texts, texts_b, expected", [
    (["a great movie"], [""], "texts_b[0] is empty"),
    (["a great movie"], [3], "texts_b[0] must be a string, not int"),
    (["a great movie", "a dull movie"], "the best film", "texts_b must be a list of strings"),
    (["a great movie", "a dull movie"], ["the best film"], "2 texts but 1 second texts"),
], ids=["empty", "int", "bare-string", "length"])
def test_bad_second_texts_are_input_errors(bundle, texts, texts_b, expected):
    with pytest.raises(InputError, match=re.escape(expected)):
        bundle.predict(texts, texts_b)


def test_tasks_per_row_must_match_the_texts(bundle):
    with pytest.raises(InputError, match=r"^1 texts but 2 tasks$"):
        bundle.predict(["a great movie"], task=["toy-soft", "toy-soft"])


@pytest.mark.parametrize("line, message", [
    ('{"text": ""}', "in.jsonl:2: field 'text' is empty"),  # the words the API refuses it in (`... is empty`)
    ('{"text": "ok \\ud83d"}', "in.jsonl:2: field 'text' holds a lone surrogate (U+D83D at character 4)"),
])
def test_a_bad_jsonl_line_is_refused_naming_file_line_and_field(tiny_bundle, tmp_path, line, message):
    f = tmp_path / "in.jsonl"
    f.write_text('{"text": "a great movie"}\n' + line + "\n", encoding="utf-8")
    code, err, out = pt_run("predict", f, "--bundle", tiny_bundle)
    assert code == 1 and "Traceback" not in err and out == ""
    assert message in err


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return write_chat_bundle(tmp_path_factory.mktemp("chat"))


def test_a_prompt_with_a_lone_surrogate_is_refused(chat):
    with pytest.raises(InputError, match=re.escape("the prompt holds a lone surrogate (U+D83D at character 4)")):
        Bundle.load(chat).generate("ok \ud83d", max_new_tokens=2)
    # A command line's bytes that are not UTF-8 reach Python as lone surrogates.
    code, err, _ = pt_run("generate", chat, b"caf\xff".decode("utf-8", "surrogateescape"), "--max-new-tokens", 2)
    assert_one_error_line(code, err, "the prompt holds a lone surrogate (U+DCFF at character 4)")
