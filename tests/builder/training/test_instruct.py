"""Instruction tuning a soft prompt with the LM loss (builder.instruct), on the tiny Llama of tests/checkpoints."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from mindspore import Tensor, ops

from checkpoints import ROOT, write_llama_checkpoint
from ptbundle.builder.backbones.backbone import load_backbone
from ptbundle.builder.models.decoder import DecoderClassifier
from ptbundle.builder.errors import DataError, RecipeError
from ptbundle.builder.training.chat import (CHAT_FORMAT, IGNORE, Example, batch_arrays, encode_example, instruction_tokenizer, prompt_ids, read_instructions)
from ptbundle.builder.training.instruct import TargetLogits, build_model, greedy, greedy_ids, reference, train_prompt
from ptbundle.builder.models.prompts import PromptSpec
from ptbundle.builder.recipe import Recipe
from ptbundle.runtime.generate import Generator
from ptbundle.runtime.template import Template

SHIPPED = ROOT / "data" / "instructions"
P = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_backbone(write_llama_checkpoint(tmp_path_factory.mktemp("tiny-llama-instruct")))


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return instruction_tokenizer(tiny)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- reading ---------------------------------------------------------------------------------------------------

def test_reads_the_shipped_set():
    train, dev = read_instructions(SHIPPED / "train.jsonl"), read_instructions(SHIPPED / "dev.jsonl")
    assert (len(train), len(dev)) == (160, 40)
    assert not {(e.instruction, e.input) for e in train} & {(e.instruction, e.input) for e in dev}
    assert all(e.output and e.where for e in train + dev)


def test_reads_input_optional(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [
        json.dumps({"instruction": "Say hi.", "output": "Hi."}), "",
        json.dumps({"instruction": "Repeat.", "input": "ab", "output": "ab"})])
    a, b = read_instructions(path)
    assert (a.input, b.input, b.where) == ("", "ab", f"{path}:3")
    assert CHAT_FORMAT.user_text(a) == "Say hi." and CHAT_FORMAT.user_text(b) == "Repeat.\nab"


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "x", "output": ', r":2: not valid JSON"),
    ('["x"]', r":2: expected a JSON object, got list"),
    ('{"input": "x", "output": "y"}', r":2: no field 'instruction'"),
    ('{"instruction": "x", "input": ""}', r":2: no field 'output'"),
    ('{"instruction": "x", "input": 3, "output": "y"}', r":2: field 'input' is int, not a string"),
    ('{"instruction": "x", "output": null}', r":2: field 'output' is NoneType, not a string"),
    ('{"instruction": "x", "output": "  "}', r":2: empty field 'output'"),
    ('{"instruction": "", "output": "y"}', r":2: empty field 'instruction'"),
])
def test_bad_lines_are_one_line_errors(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"instruction": "ok", "input": "", "output": "ok"}), line])
    with pytest.raises(DataError, match=message) as e:
        read_instructions(path)
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{path}:2:")


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="no examples"):
        read_instructions(write_lines(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(DataError, match="cannot read"):
        read_instructions(tmp_path / "nothing.jsonl")


# --- tokens ----------------------------------------------------------------------------------------------------

def byte_ids(tokenizer, text):
    return [tokenizer.token_to_id(t) for t in tokenizer.encode(text, add_special_tokens=False).tokens]


def test_labels_mask_only_the_target(tokenizer):
    """ChatML token by token (the tiny tokenizer: specials 0-2, then one token per byte): the prompt's labels are
    ignored, the answer's and <|im_end|>'s are the answer's ids."""
    e = encode_example(tokenizer, Example("Hi", "ab", "ok"))
    b = lambda s: byte_ids(tokenizer, s)  # noqa: E731
    prompt = [1] + b("user\nHi\nab") + [2] + b("\n") + [1] + b("assistant\n")
    target = b("ok") + [2]
    assert e.ids == prompt + target
    assert e.labels == [IGNORE] * len(prompt) + target
    assert e.prompt_length == len(prompt)
    # position t predicts token t + 1: from the prompt's last token (the newline after "assistant") on
    assert e.target_positions() == list(range(len(prompt) - 1, len(e.ids) - 1))


def test_prompt_ids_are_what_the_runtime_generator_feeds(tokenizer):
    """Training sees the ids runtime.generate.Generator.encode gives (the newline before {text} stays a newline)."""
    shim = SimpleNamespace(template=Template.parse(CHAT_FORMAT.template), tokenizer=tokenizer)
    for text in ("Hi", "Hi\nthere", " leading space", "What is 2 plus 2?"):
        assert prompt_ids(tokenizer, text) == Generator.encode(shim, text)


def test_too_long_is_an_error(tokenizer):
    with pytest.raises(DataError, match=r"x.jsonl:7: .* more than --max-length 16"):
        encode_example(tokenizer, Example("a long instruction", "", "answer", "x.jsonl:7"), max_length=16)


def test_batch_arrays_pad_and_point_at_targets(tokenizer):
    a, b = encode_example(tokenizer, Example("Hi", "", "ok")), encode_example(tokenizer, Example("Hello", "x", "yes"))
    ids, mask, index, targets, weight = batch_arrays([a, b], pad_id=2)
    assert ids.shape[1] % 16 == 0 and index.shape[1] % 8 == 0
    for row, e in enumerate((a, b)):
        n = int(weight[row].sum())
        assert n == len(e.target_positions())
        assert list(targets[row, :n]) == [x for x in e.labels if x != IGNORE]
        assert list(ids[row, index[row, :n] + 1]) == list(targets[row, :n])
        assert mask[row].sum() == len(e.ids)


# --- the loss --------------------------------------------------------------------------------------------------

EXAMPLES = [Example("Hi", "", "ok"), Example("Repeat", "abc", "abc"), Example("Opposite of up", "", "down")]


def numpy_loss(logits, ids, mask, index, targets, weight, offset=0):
    """Mean cross-entropy over weighted targets, from full logits [b, offset + S, V]."""
    total = 0.0
    for r in range(len(ids)):
        for j in range(index.shape[1]):
            if weight[r, j]:
                z = logits[r, offset + index[r, j]].astype(np.float64)
                total += np.log(np.exp(z - z.max()).sum()) + z.max() - z[targets[r, j]]
    return total / weight.sum()


@pytest.mark.parametrize("method", ["none", "prompt-tuning"])
def test_loss_is_cross_entropy_of_the_decoders_logits_at_the_targets(tiny, tokenizer, method):
    rng = np.random.RandomState(1)
    spec = PromptSpec.of(method, P)
    prompt = rng.standard_normal((P, tiny.config.hidden_size)).astype(np.float32)
    model = build_model(tiny, spec, {"prompt_embeddings": prompt} if method != "none" else None)
    arrays = batch_arrays([encode_example(tokenizer, e) for e in EXAMPLES], tiny.config.pad_token_id)
    loss, losses, predicted = model(*(Tensor(a) for a in arrays))
    ids, mask = arrays[:2]
    decoder = model.decoder
    embeds = decoder.embed(Tensor(ids))
    m = Tensor(mask)
    offset = 0
    if method == "prompt-tuning":  # the Decoder itself with the prompt's vectors in front
        embeds = ops.concat((Tensor(np.broadcast_to(prompt, (len(ids), P, prompt.shape[1])).copy()), embeds), 1)
        m = Tensor(np.concatenate([np.ones((len(ids), P), np.int32), mask], 1))
        offset = P
    full = decoder.logits(decoder(embeds, m)).asnumpy()
    expected = numpy_loss(full, *arrays, offset=offset)
    assert abs(float(loss.asnumpy()) - expected) < 1e-5 * max(1.0, expected)
    # the per-target losses and argmax ids are the same positions'
    index, weight = arrays[2], arrays[4]
    at = full[np.arange(len(ids))[:, None], offset + index]
    assert np.array_equal(predicted.asnumpy()[weight > 0], at.argmax(-1)[weight > 0])
    assert abs(losses.asnumpy().sum() / weight.sum() - expected) < 1e-5 * max(1.0, expected)


# --- training, and the cache of what was trained ---------------------------------------------------------------

MEMORISE = [Example("Say one word", "", "up"), Example("Say two words", "", "down low"),
            Example("Copy", "abc", "abc"), Example("Copy", "xyz", "xyz")] * 2


@pytest.fixture(scope="module", params=["prompt-tuning", "prefix-tuning"])
def trained(request, tiny):
    recipe = Recipe(method=request.param, virtual_tokens=P, epochs=4, batch_size=4, prompt_lr=0.1, warmup=0.1)
    lines = []
    model, curve, metrics = train_prompt(tiny, MEMORISE, MEMORISE[:4], recipe, log=lines.append)
    return model, curve, metrics, lines


def test_training_lowers_the_loss(trained):
    model, curve, metrics, lines = trained
    assert len(curve) == 4 and metrics["steps"] == 8
    assert curve[-1]["train_loss"] < curve[0]["train_loss"]
    assert metrics["dev"]["loss"] < metrics["before"]["initial_prompt"]["loss"]
    assert metrics["dev"]["loss"] == min(p["dev"]["loss"] for p in curve)
    assert set(metrics["before"]) == {"no_prompt", "default_system", "initial_prompt"}
    assert any(line.startswith("epoch 4: train loss") for line in lines)


def test_initial_prompt_is_the_init_texts_hard_prompt(tiny, tokenizer):
    """Before training, a prompt started from text is that text: a shallow prompt its embeddings at positions
    0..P-1, a prefix its KV cache; either gives the logits of the text in front of the chat."""
    from ptbundle.builder.training.init import initial_prompt

    text = "<|im_start|>sys"
    n = len(tokenizer.encode(text, add_special_tokens=False).ids)
    arrays = batch_arrays([encode_example(tokenizer, e) for e in EXAMPLES], tiny.config.pad_token_id)
    plain = build_model(tiny, PromptSpec())
    hard = [encode_example(tokenizer, e) for e in EXAMPLES]
    hard = [type(e)(tokenizer.encode(text, add_special_tokens=False).ids + e.ids,
                    [IGNORE] * n + e.labels) for e in hard]
    expected = float(plain(*(Tensor(a) for a in batch_arrays(hard, tiny.config.pad_token_id)))[0].asnumpy())
    for method in ("prompt-tuning", "prefix-tuning"):
        recipe = Recipe(method=method, virtual_tokens=n, init="text", init_text=text)
        model = build_model(tiny, recipe.prompt_spec(), initial_prompt(tiny, recipe, tokenizer, []))
        assert abs(float(model(*(Tensor(a) for a in arrays))[0].asnumpy()) - expected) < 1e-4


def prefix_table(cache, layers, p):
    """A prefix's [P, layers * 2 * kv_width] table holding exactly `cache` (builder.prompts' layout)."""
    flat = lambda a: a.transpose(1, 0, 2).reshape(p, -1)  # noqa: E731
    return np.concatenate([np.concatenate([flat(cache[f"key.{i}"]), flat(cache[f"value.{i}"])], 1)
                           for i in range(layers)], 1)


def test_prompt_cache_continues_the_text_as_the_trained_net(trained, tiny, tokenizer):
    """The trained prompt's cache, put in front of every layer as a prefix, gives the trained net's logits at every
    text position (what a generation bundle starts its KV cache with)."""
    model = trained[0]
    cache = model.prompt_cache()
    assert cache["key.0"].shape == (tiny.config.num_kv_heads, P, tiny.config.head_dim)
    prefix = build_model(tiny, PromptSpec.of("prefix-tuning", P),
                         {"prompt_embeddings": prefix_table(cache, tiny.config.num_layers, P)})
    ids, mask = batch_arrays([encode_example(tokenizer, e) for e in EXAMPLES], tiny.config.pad_token_id)[:2]
    ours, theirs = reference(model)(ids, mask), reference(prefix)(ids, mask)
    valid = mask.astype(bool)
    assert np.abs(ours[valid] - theirs[valid]).max() < 1e-4
    # and the last position through DecoderClassifier, the bundle's own reading of a prompt
    last = ours[np.arange(len(ids)), mask.sum(1) - 1]
    net = DecoderClassifier(model.decoder, tiny.config.vocab_size, PromptSpec.of("prefix-tuning", P))
    net.load_head_state({"classifier.weight": tiny.word_embeddings, "classifier.bias": np.zeros(tiny.config.vocab_size),
                         "prompt_embeddings": prefix_table(cache, tiny.config.num_layers, P)})
    assert np.abs(net(Tensor(ids), Tensor(mask), Tensor(mask)).asnumpy() - last).max() < 1e-4


def test_greedy_reads_the_logits_of_the_last_position(trained, tokenizer):
    model = trained[0]
    cell = TargetLogits(model)
    out = greedy_ids(model, tokenizer, "Say one word", max_new_tokens=3, cell=cell)
    assert len(out) <= 3 and 2 not in out
    ids = prompt_ids(tokenizer, "Say one word")
    first = int(reference(model)(np.array([ids], np.int32), np.ones((1, len(ids)), np.int32))[0, -1].argmax())
    assert out[:1] == ([] if first == 2 else [first])
    assert greedy(model, tokenizer, "Say one word", max_new_tokens=3, cell=cell) == tokenizer.decode(out)


def test_recipe_needs_a_prompt(tiny):
    with pytest.raises(RecipeError, match="at least 1 token"):
        train_prompt(tiny, MEMORISE, MEMORISE, Recipe(virtual_tokens=0))
