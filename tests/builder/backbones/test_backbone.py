"""The MindSpore encoder reproduces Hugging Face + PEFT, and bad checkpoints fail clearly."""

import json
from pathlib import Path

import numpy as np
import pytest
from mindspore import Tensor
from safetensors.numpy import load_file, save_file

from checkpoints import FIXTURES, write_checkpoint
from ptbundle.builder.backbones.backbone import load_backbone
from ptbundle.builder.errors import BackboneError
from ptbundle.builder.models.classifier import PromptClassifier
from ptbundle.builder.families.encoder import ENCODER

FIXTURE = np.load(FIXTURES / "reference_logits.npz")
TOLERANCE = 1e-5

# case -> (checkpoint, pooling, head dense from the fixture instead of the checkpoint)
CASES = {
    "tiny-bert-cls": ("bert", "cls", False),
    "tiny-bert-pair": ("bert", "cls", False),
    "tiny-roberta-cls": ("roberta", "cls", True),
    "tiny-bert-mean": ("bert", "mean", False),
    "tiny-roberta-mean": ("roberta", "mean", False),
    "tiny-bert-noprompt-mean": ("bert", "mean", False),
    "minilm-cls": ("minilm", "cls", False),
    "minilm-mean": ("minilm", "mean", False),
}


def reference(case, key):
    return FIXTURE[f"{case}/{key}"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_huggingface_peft(case, tiny_bert, tiny_roberta):
    family, pooling, fixture_pooler = CASES[case]
    backbone = load_backbone({"bert": tiny_bert, "roberta": tiny_roberta, "minilm": None}[family])
    prompt = reference(case, "prompt_embeddings")
    net = PromptClassifier(ENCODER.model(backbone), prompt.shape[0], reference(case, "logits").shape[1], pooling)
    head = {"classifier.weight": reference(case, "classifier.weight"), "classifier.bias": reference(case, "classifier.bias")}
    if prompt.shape[0]:
        head["prompt_embeddings"] = prompt
    if pooling == "cls":
        if fixture_pooler:
            head["pooler.weight"], head["pooler.bias"] = reference(case, "pooler.weight"), reference(case, "pooler.bias")
        else:
            head["pooler.weight"], head["pooler.bias"] = backbone.pooler_weights()
    net.load_head_state(head)
    inputs = [Tensor(reference(case, k).astype(np.int32)) for k in ("input_ids", "attention_mask", "token_type_ids")]
    logits = net(*inputs).asnumpy()
    expected = reference(case, "logits")
    assert np.abs(expected).max() > 0.1  # the comparison is not between near-zeros
    np.testing.assert_allclose(logits, expected, atol=TOLERANCE, rtol=0)


def test_fixture_matches_the_checkpoints_the_tests_write(tiny_bert):
    """The reference was computed on exactly these weights (same seed, same bytes)."""
    from checkpoints import random_head

    head = random_head(32, 4, 3, seed=1)
    np.testing.assert_array_equal(head["prompt_embeddings"], reference("tiny-bert-cls", "prompt_embeddings"))
    tensors = load_file(str(tiny_bert / "model.safetensors"))
    assert tensors["bert.embeddings.word_embeddings.weight"].shape[1] == 32


def test_prefixless_and_prefixed_names_load_the_same(tiny_bert, tmp_path):
    tensors = load_file(str(tiny_bert / "model.safetensors"))
    plain = write_checkpoint(tmp_path / "plain", "bert")
    save_file({k.removeprefix("bert."): v for k, v in tensors.items()}, str(plain / "model.safetensors"))
    a, b = load_backbone(tiny_bert), load_backbone(plain)
    for key in a.weights:
        np.testing.assert_array_equal(a.weights[key], b.weights[key])


def broken(tmp_path, edit):
    d = write_checkpoint(tmp_path / "ckpt", "bert")
    edit(d)
    return d


def test_missing_file_is_named(tmp_path):
    d = broken(tmp_path, lambda d: (d / "tokenizer.json").unlink())
    with pytest.raises(BackboneError, match="missing tokenizer.json"):
        load_backbone(d)


def test_unknown_model_type_is_named(tmp_path):
    def gpt(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["model_type"] = "gpt2"
        (d / "config.json").write_text(json.dumps(cfg))

    with pytest.raises(BackboneError, match="model_type 'gpt2' is not supported"):
        load_backbone(broken(tmp_path, gpt))


def test_shape_mismatch_names_the_tensor(tmp_path):
    def wider(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["intermediate_size"] = 128
        (d / "config.json").write_text(json.dumps(cfg))

    with pytest.raises(BackboneError, match=r"encoder.layer.0.intermediate.dense.weight has shape \(64, 32\)"):
        load_backbone(broken(tmp_path, wider))


def test_missing_tensor_is_named(tmp_path):
    def drop(d):
        t = load_file(str(d / "model.safetensors"))
        del t["bert.encoder.layer.1.output.dense.bias"]
        save_file(t, str(d / "model.safetensors"))

    with pytest.raises(BackboneError, match="missing tensor encoder.layer.1.output.dense.bias"):
        load_backbone(broken(tmp_path, drop))


def test_corrupt_files_are_named(tmp_path):
    d = broken(tmp_path, lambda d: (d / "config.json").write_text("{not json"))
    with pytest.raises(BackboneError, match="config.json: not valid JSON"):
        load_backbone(d)
    d2 = write_checkpoint(tmp_path / "b", "bert")
    (d2 / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(BackboneError, match="cannot read safetensors"):
        load_backbone(d2)


def test_missing_config_field_is_named(tmp_path):
    def drop_field(d):
        cfg = json.loads((d / "config.json").read_text())
        del cfg["num_attention_heads"]
        (d / "config.json").write_text(json.dumps(cfg))

    with pytest.raises(BackboneError, match="missing field 'num_attention_heads'"):
        load_backbone(broken(tmp_path, drop_field))


def test_pad_id_disagreeing_with_the_tokenizer_is_named(tmp_path):
    def other_pad(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["pad_token_id"] = 3
        (d / "config.json").write_text(json.dumps(cfg))

    with pytest.raises(BackboneError, match=r"tokenizer.json: pad token '\[PAD\]' is id 0, "
                                            r"config.json's pad_token_id is 3"):
        load_backbone(broken(tmp_path, other_pad))


def test_the_architecture_decides_offsets_and_token_types(tiny_bert, tiny_roberta):
    bert, roberta = load_backbone(tiny_bert), load_backbone(tiny_roberta)
    assert (bert.config.position_offset, roberta.config.position_offset) == (0, 2)
    assert bert.special_tokens == {"cls": 2, "sep": 3, "pad": 0}
    assert roberta.special_tokens == {"cls": 0, "sep": 2, "pad": 1}
    assert bert.pooler_weights() is not None and roberta.pooler_weights() is None
    np.testing.assert_array_equal(bert.word_embeddings, bert.weights["embeddings.word_embeddings.weight"])
