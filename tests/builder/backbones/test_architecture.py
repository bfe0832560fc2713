"""A new architecture is one declaration: registered here, from the test alone, it loads, trains, exports and serves.

The architecture is DistilBERT-like: other tensor names ("distilbert."
prefix, `transformer.layer.{i}.attention.q_lin`), other config.json keys
(`dim`, `n_layers`, `activation`), no token types.  Its encoder is checked
against a numpy forward pass written from the checkpoint's own tensor names,
and a bundle is built with the real pt-build and run with the runtime.
"""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from mindspore import Tensor
from safetensors.numpy import load_file, save_file

from checkpoints import HEADS, HIDDEN, LAYERS, write_checkpoint
from extensions import DISTILBERT, LAYER, write_distilbert
from ptbundle.builder.backbones import architectures
from ptbundle.builder.backbones.architectures import Architecture
from ptbundle.builder.backbones.backbone import load_backbone
from ptbundle.builder.errors import BackboneError
from ptbundle.builder.models.encoder import Encoder
from ptbundle.builder.families.encoder import ENCODER

@pytest.fixture(scope="module", autouse=True)
def distilbert_registered():
    architectures.register(DISTILBERT)
    yield
    architectures.ARCHITECTURES.pop("distilbert", None)


@pytest.fixture(scope="module")
def tiny_distilbert(tmp_path_factory):
    return write_distilbert(tmp_path_factory.mktemp("tiny-distilbert"))


def numpy_distilbert(t: dict, ids, mask, heads=HEADS, eps=1e-12):
    """DistilBERT's forward pass (transformers' modeling_distilbert, eval mode) from the checkpoint's names."""
    erf = np.vectorize(math.erf)

    def ln(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * t[name + ".weight"] + t[name + ".bias"]

    def lin(x, name):
        return x @ t[name + ".weight"].T + t[name + ".bias"]

    p = "distilbert."
    b, s = ids.shape
    x = ln(t[p + "embeddings.word_embeddings.weight"][ids] + t[p + "embeddings.position_embeddings.weight"][:s],
           p + "embeddings.LayerNorm")
    d = x.shape[-1] // heads
    split = lambda y: y.reshape(b, s, heads, d).transpose(0, 2, 1, 3)  # noqa: E731
    for n in range(LAYERS):
        l = p + LAYER.format(i=n)
        q, k, v = (split(lin(x, l + f"attention.{c}_lin")) for c in "qkv")
        scores = q / math.sqrt(d) @ k.transpose(0, 1, 3, 2)
        scores = np.where(mask[:, None, None, :] == 0, np.finfo(np.float32).min, scores)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, -1)
        x = ln(lin(ctx, l + "attention.out_lin") + x, l + "sa_layer_norm")
        up = lin(x, l + "ffn.lin1")
        x = ln(lin(up * 0.5 * (1 + erf(up / math.sqrt(2))), l + "ffn.lin2") + x, l + "output_layer_norm")
    return x


def test_the_encoder_matches_a_numpy_distilbert(tiny_distilbert):
    backbone = load_backbone(tiny_distilbert)
    assert backbone.config.type_vocab_size == 0 and backbone.config.position_offset == 0
    assert backbone.config.hidden_size == HIDDEN and backbone.config.num_layers == LAYERS
    rng = np.random.RandomState(3)
    ids = rng.randint(5, backbone.config.vocab_size, (3, 11)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:], mask[2, 4:] = 0, 0
    types = rng.randint(0, 2, ids.shape).astype(np.int32)  # ignored: the architecture has none
    hidden = ENCODER.model(backbone)(Tensor(backbone.word_embeddings[ids]), Tensor(mask), Tensor(types)).asnumpy()
    expected = numpy_distilbert(load_file(str(tiny_distilbert / "model.safetensors")), ids, mask)
    assert np.abs(expected).max() > 0.1
    keep = mask.astype(bool)  # padded rows attend like any other in both; compare the text rows
    np.testing.assert_allclose(hidden[keep], expected[keep], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert"])
def test_the_weight_map_names_exactly_the_encoders_parameters(kind, tiny_bert, tiny_roberta, tiny_distilbert):
    backbone = load_backbone({"bert": tiny_bert, "roberta": tiny_roberta, "distilbert": tiny_distilbert}[kind])
    ours = {name: tuple(p.shape) for name, p in Encoder(backbone.config).parameters_and_names()}
    assert ours == backbone.config.parameter_shapes() == {n: w.shape for n, w in backbone.weight_map.items()}


def test_a_distilbert_bundle_builds_and_serves(tiny_distilbert, toy_files, tmp_path):
    import onnx  # after MindSpore (see builder/onnx_export.py)

    from ptbundle.builder.cli import cli
    from ptbundle.runtime import Bundle

    train, dev = toy_files
    result = CliRunner().invoke(cli, ["export", "--prompt", "soft", "--train", str(train), "--dev", str(dev),
                                      "--backbone", str(tiny_distilbert), "--virtual-tokens", "2", "--epochs", "1",
                                      "--batch-size", "16", "--max-length", "32",
                                      "--out", str(tmp_path), "--name", "distil"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "(distilbert, 2x32)" in result.output
    bundle = Bundle.load(tmp_path / "distil")
    assert bundle.manifest.backbone.model_type == "distilbert"
    predictions = bundle.predict(["a great movie", "the worst film ever"])
    assert len(predictions) == 2 and all(p.label in ("neg", "pos") for p in predictions)

    # The graph's initializers are our parameter names (from the weight map); token types are not read.
    graph = onnx.load(str(tmp_path / "distil" / "model.onnx")).graph
    names = {i.name for i in graph.initializer}
    assert "layers.1.attention.qkv.weight" in names and "embeddings.word" in names
    assert not any("token_type" in n for n in names)
    ids = np.array([[2, 10, 20, 30, 3]], np.int32)
    mask = np.ones_like(ids)
    np.testing.assert_array_equal(bundle.model(ids, mask, np.zeros_like(ids)), bundle.model(ids, mask, mask))


def wrong_kind(tmp_path, edit):
    d = write_checkpoint(tmp_path / "ckpt", "bert")
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(model_type="gpt2"), r"model_type 'gpt2' is not supported \(supported: bert, distilbert, llama, qwen2, roberta\)"),
    (lambda c: c.pop("model_type"), "model_type None is not supported"),
    (lambda c: c.pop("hidden_size"), "missing field 'hidden_size'"),
    (lambda c: c.update(num_hidden_layers="two"), "field 'num_hidden_layers' is 'two', not int"),
    (lambda c: c.update(hidden_act="relu"), "hidden_act 'relu' is not supported"),
    (lambda c: c.update(model_type="distilbert"), "missing field 'dim'"),
])
def test_a_backbone_of_the_wrong_kind_is_one_line_naming_config_json(tmp_path, edit, message):
    d = wrong_kind(tmp_path, edit)
    with pytest.raises(BackboneError, match=message) as e:
        load_backbone(d)
    assert str(e.value).startswith(str(d / "config.json") + ": ") and "\n" not in str(e.value)


def test_bert_tensors_under_a_distilbert_config_name_the_missing_tensor(tmp_path):
    d = write_distilbert(tmp_path / "ckpt")
    save_file(load_file(str(write_checkpoint(tmp_path / "bert", "bert") / "model.safetensors")),
              str(d / "model.safetensors"))
    with pytest.raises(BackboneError, match=r"model.safetensors: missing tensor embeddings.word_embeddings.weight"
                                            r" \(for embeddings.word\)"):
        load_backbone(d)


def test_a_tokenizer_without_the_architectures_pad_token_is_named(tmp_path):
    from checkpoints import roberta_tokenizer

    d = write_checkpoint(tmp_path / "ckpt", "bert")
    roberta_tokenizer().save(str(d / "tokenizer.json"))  # BERT's [CLS]/[SEP]/[PAD] are not in it
    with pytest.raises(BackboneError, match=r"tokenizer.json: no cls token '\[CLS\]'"):
        load_backbone(d)


def test_an_architecture_that_maps_too_little_is_named():
    partial = Architecture("partial", weights={"embeddings.word": "w"})
    cfg = load_backbone_config_for(partial)
    with pytest.raises(BackboneError, match="architecture 'partial' maps no checkpoint tensor to embeddings.position"):
        architectures.weight_map(partial, cfg)


def load_backbone_config_for(arch):
    raw = {"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 16, "max_position_embeddings": 12}
    return architectures.config_from(arch, raw, "config.json")
