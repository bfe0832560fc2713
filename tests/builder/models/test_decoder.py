"""The Llama decoder (builder.decoder) against transformers + PEFT, on the tiny Llama of tests/checkpoints.

fixtures/llama_reference.npz holds transformers' logits for the same weights
(fixtures/make_llama_reference.py made it); these tests read them through
the real code paths: the checkpoint loaded by load_backbone, the MindSpore
Decoder, the DecoderClassifier with each prompt method, and its ONNX graph.
A head as wide as the vocabulary (the whole LM head as "label words") makes
the classifier return the LM's full next-token logits at each row's last
token, so it can be held to the reference.
"""

import hashlib

import numpy as np
import pytest
from mindspore import Tensor

from checkpoints import FIXTURES, write_llama_checkpoint, write_qwen2_checkpoint
from ptbundle.builder.backbones.backbone import load_backbone
from ptbundle.builder.models.decoder import DecoderClassifier
from ptbundle.builder.families import family_of
from ptbundle.builder.errors import BackboneError, RecipeError
from ptbundle.builder.graphs.targets import export_onnx
from ptbundle.builder.models.prompts import PromptSpec
from ptbundle.runtime.onnx_backend import OnnxModel
from ptbundle.builder.families.decoder import DECODER

REFERENCE = FIXTURES / "llama_reference.npz"
P = 5  # the reference's virtual tokens


@pytest.fixture(scope="module")
def ref():
    return np.load(REFERENCE)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, ref):
    d = write_llama_checkpoint(tmp_path_factory.mktemp("tiny-llama"))
    digest = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    assert digest == str(ref["plain/checkpoint_sha256"]), "checkpoints.py changed: remake the fixture"
    return load_backbone(d)


WRITERS = {"llama": write_llama_checkpoint, "qwen2": write_qwen2_checkpoint}


@pytest.fixture(scope="module", params=list(WRITERS))
def family_case(request, tmp_path_factory):
    """(tied backbone, untied backbone, reference) of each decoder architecture: Llama, and Qwen2 (q/k/v biases)."""
    ref = np.load(FIXTURES / f"{request.param}_reference.npz")
    tied = WRITERS[request.param](tmp_path_factory.mktemp(request.param))
    digest = hashlib.sha256((tied / "model.safetensors").read_bytes()).hexdigest()
    assert digest == str(ref["plain/checkpoint_sha256"]), "checkpoints.py changed: remake the fixture"
    untied = WRITERS[request.param](tmp_path_factory.mktemp(request.param + "-untied"), tie=False)
    return load_backbone(tied), load_backbone(untied), ref


def vocab_classifier(backbone, spec=PromptSpec(), prompt=None) -> DecoderClassifier:
    """A classifier whose "label words" are the whole vocabulary: its logits are the LM's next-token logits."""
    net = DecoderClassifier(DECODER.model(backbone), backbone.config.vocab_size, spec)
    table = backbone.word_embeddings if backbone.config.tie_embeddings else backbone.weights["lm_head.weight"]
    net.load_head_state({"classifier.weight": table, "classifier.bias": np.zeros(backbone.config.vocab_size),
                         **({"prompt_embeddings": prompt} if prompt is not None else {})})
    return net


def run(net, ids, mask):
    return net(Tensor(ids), Tensor(mask), Tensor(np.zeros_like(ids))).asnumpy()


def last_rows(logits, mask, offset=0):
    """Each row's logits at its last text token: [b, vocab]."""
    return logits[np.arange(len(mask)), offset + mask.sum(1) - 1]


def test_decoder_matches_transformers_at_every_position(family_case):
    backbone, _, ref = family_case
    ids, mask = ref["plain/input_ids"], ref["plain/attention_mask"]
    decoder = DECODER.model(backbone)
    logits = decoder.logits(decoder(decoder.embed(Tensor(ids)), Tensor(mask))).asnumpy()
    valid = mask.astype(bool)
    assert np.abs(logits[valid] - ref["plain/logits"][valid]).max() < 1e-4
    for i in range(len(ids)):  # each row alone, unpadded
        n = int(mask[i].sum())
        alone = decoder.logits(decoder(decoder.embed(Tensor(ids[i : i + 1, :n])), Tensor(mask[i : i + 1, :n])))
        assert np.abs(alone.asnumpy() - ref[f"plain/row{i}/logits"]).max() < 1e-4


def test_untied_head_matches_transformers(family_case):
    _, untied, ref = family_case
    ids, mask = ref["plain/input_ids"], ref["plain/attention_mask"]
    expected = last_rows(ref["untied/logits"], mask)
    assert np.abs(run(vocab_classifier(untied), ids, mask) - expected).max() < 1e-4


@pytest.mark.parametrize("method", ["none", "prefix-tuning", "prompt-tuning"])
def test_classifier_reads_the_lm_head_as_peft_does(family_case, method, tmp_path):
    """PEFT CAUSAL_LM prefix and prompt tuning: same logits at each row's last token, in MindSpore and ONNX."""
    tiny_llama, _, ref = family_case
    ids, mask = ref["plain/input_ids"], ref["plain/attention_mask"]
    if method == "none":
        net, expected = vocab_classifier(tiny_llama), last_rows(ref["plain/logits"], mask)
    elif method == "prefix-tuning":
        net = vocab_classifier(tiny_llama, PromptSpec.of(method, P), ref["prefix/prefix"])
        expected = last_rows(ref["prefix/logits"], mask)
    else:  # PEFT returns the virtual positions' logits first
        net = vocab_classifier(tiny_llama, PromptSpec.of(method, P), ref["prompt-tuning/prompt_embeddings"])
        expected = last_rows(ref["prompt-tuning/logits"], mask, offset=P)
    assert np.abs(run(net, ids, mask) - expected).max() < 1e-4
    onnx = OnnxModel(export_onnx(net, tmp_path / "model.onnx"))
    assert np.abs(onnx(ids, mask, np.zeros_like(ids)) - expected).max() < 1e-4


def test_prefix_from_a_higher_layer_splits_at_that_layer(tiny_llama, ref, tmp_path):
    """A prefix from layer 1 leaves layer 0 on the text alone: lower() once, upper_features() after, equal to
    the whole pass, and the ONNX graph (an empty past below layer 1) agrees."""
    ids, mask = ref["plain/input_ids"], ref["plain/attention_mask"]
    table = np.random.RandomState(0).standard_normal((P, 2 * tiny_llama.config.kv_width)).astype(np.float32)
    net = vocab_classifier(tiny_llama, PromptSpec.of("prefix-tuning", P, layer=1), table)
    assert net.split == 1
    whole = run(net, ids, mask)
    states, m = net.lower(Tensor(ids), Tensor(mask), Tensor(np.zeros_like(ids)))
    parts = net.classifier(net.upper_features(states, m)).asnumpy()
    assert np.abs(parts - whole).max() < 1e-5
    onnx = OnnxModel(export_onnx(net, tmp_path / "model.onnx"))
    assert np.abs(onnx(ids, mask, np.zeros_like(ids)) - whole).max() < 1e-4


def test_layer_cache_of_a_decoder_gives_the_whole_pass(tiny_llama):
    """Training a prefix from layer 1 reads layer 0's states from LayerCache, which a decoder computes in
    onnxruntime (ScratchOnnx) with each batch padded to its longest row only: equal to the whole MindSpore pass
    for texts of many lengths, in batches that mix them."""
    from ptbundle.builder.training.forward import LayerCache, Upper
    from ptbundle.builder.graphs.runners import ScratchOnnx
    from ptbundle.runtime.text import encode, load_tokenizer

    table = np.random.RandomState(1).standard_normal((P, 2 * tiny_llama.config.kv_width)).astype(np.float32)
    net = vocab_classifier(tiny_llama, PromptSpec.of("prefix-tuning", P, layer=1), table)
    texts = ["a great movie", "dull", "the worst film ever , boring acting and a weak story , dull dull dull",
             "the best script", "fine", "an unusually long and winding review of a rather short film", "ok then"]
    encodings = encode(load_tokenizer(tiny_llama.tokenizer_path, 64), texts)
    assert len({len(e.ids) for e in encodings}) > 3
    onnx_lower = ScratchOnnx(net, lower=True)
    widths = []  # the real graph, called through a recorder of the padded widths it is given

    class Lower:
        pad_multiple = onnx_lower.pad_multiple

        def __call__(self, *arrays):
            widths.append(arrays[0].shape[1])
            return onnx_lower(*arrays)

    cache = LayerCache(net, encodings, 0, batch_size=3, lower=Lower())
    lengths = sorted(len(e.ids) for e in encodings)
    assert widths == [max(lengths[i : i + 3]) for i in range(0, len(lengths), 3)]  # each batch's longest row
    wholes = [run(net, np.array([e.ids], np.int32), np.ones((1, len(e.ids)), np.int32))[0] for e in encodings]
    cached = cache.logits(Upper(net), len(wholes[0]), batch_size=4)
    for i, whole in enumerate(wholes):
        assert np.abs(cached[i] - whole).max() < 1e-4, i


def test_a_prediction_does_not_depend_on_its_batch(tiny_llama, ref):
    ids, mask = ref["plain/input_ids"], ref["plain/attention_mask"]
    net = vocab_classifier(tiny_llama, PromptSpec.of("prompt-tuning", P), ref["prompt-tuning/prompt_embeddings"])
    together = run(net, ids, mask)
    for i in range(len(ids)):
        n = int(mask[i].sum())
        alone = run(net, ids[i : i + 1, :n], mask[i : i + 1, :n])
        assert np.abs(alone - together[i]).max() < 1e-4


def test_prompt_cache_is_what_the_model_caches(tiny_llama, ref):
    """A shallow prompt's cache, computed once, continues the text exactly as the prompt tokens in front do;
    a prefix's cache is its table."""
    prompt = ref["prompt-tuning/prompt_embeddings"]
    net = vocab_classifier(tiny_llama, PromptSpec.of("prompt-tuning", P), prompt)
    cache = net.prompt_cache()
    assert set(cache) == {f"{kind}.{i}" for kind in ("key", "value") for i in range(2)}
    assert cache["key.0"].shape == (2, P, 8)
    # a prefix with exactly that cache as its table gives the prompt-tuning net's logits
    table = np.concatenate([np.concatenate([cache[f"{k}.{i}"].transpose(1, 0, 2).reshape(P, -1)
                                            for k in ("key", "value")], 1) for i in range(2)], 1)
    prefix = vocab_classifier(tiny_llama, PromptSpec.of("prefix-tuning", P), table)
    ids, mask = ref["plain/input_ids"], ref["plain/attention_mask"]
    assert np.abs(run(prefix, ids, mask) - run(net, ids, mask)).max() < 1e-4
    pcache = prefix.prompt_cache()
    assert all(np.abs(pcache[k] - cache[k]).max() < 1e-6 for k in cache)


def test_prefix_started_from_tokens_is_their_cache(tiny_llama, ref):
    """builder.train's `vocab`/`text` init of a decoder's prefix: the tokens' keys and values at each layer,
    so the prefix starts out as the hard prompt those tokens make."""
    ids = [72, 105, 33, 44, 50]
    _, keys_values = family_of(tiny_llama).token_activations(tiny_llama, ids)
    table = np.concatenate(keys_values, 1)
    assert table.shape == (5, 2 * 2 * tiny_llama.config.kv_width)
    prefix = vocab_classifier(tiny_llama, PromptSpec.of("prefix-tuning", 5), table)
    text = ref["plain/input_ids"][2:3, :7]
    together = np.concatenate([np.array([ids], np.int32), text], 1)
    plain = vocab_classifier(tiny_llama)
    assert np.abs(run(prefix, text, np.ones_like(text)) - run(plain, together, np.ones_like(together))).max() < 1e-4


def test_decoder_rejects_late_prompts(tiny_llama):
    with pytest.raises(RecipeError, match="a decoder takes prompt-tuning, prefix-tuning"):
        DecoderClassifier(DECODER.model(tiny_llama), 2, PromptSpec.of("late-prompt", 4, layer=1))


def test_decoder_refuses_dropout(tiny_llama):
    from ptbundle.builder.pipelines.export import check_fits
    from ptbundle.builder.recipe import Recipe

    check_fits(Recipe(), tiny_llama, soft=True)
    with pytest.raises(RecipeError, match="--dropout 0.1: .* is a decoder"):
        check_fits(Recipe(dropout=0.1), tiny_llama, soft=True)


@pytest.mark.parametrize("field, value, message", [
    ("hidden_act", "gelu", "hidden_act 'gelu' is not supported"),
    ("num_key_value_heads", 3, "not a multiple of num_key_value_heads 3"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling"),
    ("vocab_size", "many", "field 'vocab_size' is 'many', not int"),
])
def test_bad_llama_config_is_one_line(tmp_path, field, value, message):
    import json

    d = write_llama_checkpoint(tmp_path / "bad")
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BackboneError, match=message) as e:
        load_backbone(d)
    assert "\n" not in str(e.value) and "config.json" in str(e.value)


def test_missing_tokenizer_is_one_line(tmp_path):
    d = write_llama_checkpoint(tmp_path / "no-tokenizer")
    (d / "tokenizer.json").unlink()
    with pytest.raises(BackboneError, match="missing tokenizer.json"):
        load_backbone(d)


# --- pt-build export on a decoder: the real CLI, real bundles, read back by the runtime --------------------------

DECODER_TEMPLATE = "<|im_start|>user\nreview: {text}<|im_end|>\n<|im_start|>assistant\nit was"
WORDS = ("pos=great", "neg=dull")


@pytest.fixture(scope="module")
def decoder_build(tmp_path_factory, toy_files, monkeypatch_module):
    """Soft (a prefix), zero-shot and probe bundles of the toy task on the tiny Llama, given as a GGUF file (so
    the conversion is on the path), with int8 graphs."""
    from conftest import build
    from gguf_files import write_gguf

    root = tmp_path_factory.mktemp("decoder-build")
    monkeypatch_module.setenv("PTBUNDLE_CACHE", str(root / "cache"))
    gguf = write_gguf(root / "tiny.gguf", write_llama_checkpoint(root / "ckpt"))
    train, dev = toy_files
    out = root / "exports"
    result = build(["export", "--train", str(train), "--dev", str(dev), "--test", str(dev), "--backbone", str(gguf),
                    "--virtual-tokens", "4", "--epochs", "2", "--batch-size", "8", "--max-length", "64",
                    "--template", DECODER_TEMPLATE, *[x for w in WORDS for x in ("--label-text", w)],
                    "--out", str(out), "--name", "toy", "--quantize", "int8"])
    return out, result.stdout


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_decoder_bundles_are_built_and_served(decoder_build):
    from ptbundle.runtime import Bundle
    from ptbundle.runtime.format import Manifest

    out, stdout = decoder_build
    assert "hard zero-shot" in stdout and "soft" in stdout
    texts = ["a great movie", "the worst film ever", "boring acting and a weak story"]
    for name, head in (("toy-soft", "label-words"), ("toy-hard-zeroshot", "zero-shot"), ("toy-hard-probe", "probe")):
        manifest = Manifest.read(out / name)
        task = manifest.only
        assert (task.head, task.pooling, task.template) == (head, "last", DECODER_TEMPLATE)
        assert manifest.backbone.model_type == "llama" and manifest.backbone.name == "tiny"
        assert manifest.export["onnx"] < 1e-4 and manifest.export["mindir"] < 1e-5
        assert "int8" in task.metrics
        fp32 = Bundle.load(out / name)
        logits = fp32.logits(texts)
        one_by_one = np.concatenate([fp32.logits([t]) for t in texts])
        assert np.abs(logits - one_by_one).max() < 1e-4  # no row depends on its batch
        mindir = Bundle.load(out / name, backend="mindspore").logits(texts)
        assert np.abs(mindir - logits).max() < 1e-4
        int8 = Bundle.load(out / name, int8=True).logits(texts)
        assert np.abs(int8 - np.concatenate([Bundle.load(out / name, int8=True).logits([t]) for t in texts])).max() \
            < 1e-5  # fixed activation scales: int8 rows are batch-independent too
    soft = Manifest.read(out / "toy-soft").only
    assert soft.prompt_method == "prefix-tuning" and soft.details["label_words"] == {"pos": ["great"], "neg": ["dull"]}
    zero = Manifest.read(out / "toy-hard-zeroshot").only
    assert zero.details["calibration"] == "logprior"


def test_zero_shot_head_is_the_label_words_rows_calibrated(tmp_path):
    """The zero-shot head's rows are the LM head's rows of the label words' first tokens; its bias makes the
    mean log-probability of every label equal on the unlabelled texts."""
    from ptbundle.builder.families.decoder import label_rows
    from ptbundle.builder.training.hard import lm_zero_shot_head
    from ptbundle.runtime.text import load_tokenizer

    backbone = load_backbone(write_llama_checkpoint(tmp_path / "ckpt"))
    tokenizer = load_tokenizer(backbone.tokenizer_path, 64)
    rows = label_rows(backbone, tokenizer, {"pos": ["great", "best"], "neg": ["dull"]}, ["neg", "pos"])
    g, b, d = (tokenizer.encode(w, add_special_tokens=False).ids[0] for w in (" great", " best", " dull"))
    table = backbone.word_embeddings
    assert np.allclose(rows, [table[d], (table[g] + table[b]) / 2])
    unlabelled = np.random.RandomState(0).standard_normal((50, backbone.config.hidden_size)).astype(np.float32)
    head = lm_zero_shot_head(rows, unlabelled)
    logits = unlabelled @ head["classifier.weight"].T + head["classifier.bias"]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert np.ptp(logp.mean(0)) < 1e-4


def test_label_word_without_tokens_is_one_line(tmp_path):
    from ptbundle.builder.families.decoder import label_rows
    from ptbundle.runtime.text import load_tokenizer

    backbone = load_backbone(write_llama_checkpoint(tmp_path / "ckpt"))
    with pytest.raises(RecipeError, match="label word ' ' of 'pos' is empty"):
        label_rows(backbone, load_tokenizer(backbone.tokenizer_path, 64), {"pos": [" "]}, ["pos"])


def test_pt_build_instruct_writes_a_generation_bundle(tmp_path):
    """pt-build instruct on the tiny Llama: a prompt trained on instructions, its cache in the bundle, served by
    Bundle.generate; the same command without a prompt writes the baseline."""
    import json

    from conftest import build
    from ptbundle.runtime import Bundle
    from ptbundle.runtime.format import Manifest

    ckpt = write_llama_checkpoint(tmp_path / "ckpt")
    rows = [{"instruction": "Give the opposite of the word.", "input": w, "output": o}
            for w, o in (("hot", "cold"), ("up", "down"), ("big", "small"), ("early", "late"))] * 4
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--backbone", str(ckpt), "--train", str(data), "--dev", str(data), "--out", str(tmp_path / "out")]
    build(["instruct", *common, "--method", "prompt-tuning", "--virtual-tokens", "4", "--epochs", "1",
           "--batch-size", "8", "--max-length", "200"])
    build(["instruct", *common, "--prompt", "none"])
    soft, none = Manifest.read(tmp_path / "out" / "chat-soft"), Manifest.read(tmp_path / "out" / "chat-none")
    assert (soft.only.kind, soft.only.prompt_method, soft.only.num_virtual_tokens) == ("generate", "prompt-tuning", 4)
    assert (none.only.prompt_method, none.only.num_virtual_tokens) == ("none", 0)
    assert soft.export["onnx"] < 1e-4  # the graph against the trained model
    assert soft.only.metrics["dev"]["loss"] <= soft.only.metrics["before"]["initial_prompt"]["loss"] + 1e-6
    from ptbundle.builder.training.chat import instruction_tokenizer, prompt_ids

    text = "Give the opposite of the word.\nhot"
    out = Bundle.load(tmp_path / "out" / "chat-soft").generate(text, max_new_tokens=5)
    # the bundle wraps the prompt in the chat format training used, token for token
    assert out.prompt_ids == prompt_ids(instruction_tokenizer(load_backbone(ckpt)), text)
    assert (out.finish_reason, len(out.token_ids)) == ("length", 5) or \
        (out.finish_reason == "eos" and len(out.token_ids) < 5)


def test_pt_build_instruct_refuses_an_encoder(tmp_path, tiny_bert):
    from click.testing import CliRunner

    from ptbundle.builder.cli import cli

    result = CliRunner().invoke(cli, ["instruct", "--backbone", str(tiny_bert), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and "generation needs a causal LM" in result.output
    assert not (tmp_path / "out" / "chat-soft").exists()


@pytest.mark.parametrize("options, message", [
    # cannot hold the prompt cache and the export's probes
    (["--mindir-capacity", "8"], "MindIR capacity (--mindir-capacity) 8"),
    # the LM loss has none: not a recipe the manifest records and training ignores
    (["--label-smoothing", "0.1"], "--label-smoothing 0.1: pt-build instruct"),
])
def test_pt_build_instruct_refuses_before_training(tmp_path, options, message):
    """One line, before any training (no 'epoch' line, no bundle)."""
    from click.testing import CliRunner

    from ptbundle.builder.cli import cli

    ckpt = write_llama_checkpoint(tmp_path / "ckpt")
    result = CliRunner().invoke(cli, ["instruct", "--backbone", str(ckpt), "--virtual-tokens", "4", *options,
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and message in result.output
    assert "epoch" not in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out" / "chat-soft").exists()


def qwen2_with(tmp_path, edit_config=None, drop=()):
    """A tiny Qwen2 checkpoint with config.json edited and the tensors in `drop` left out."""
    import json

    from safetensors.numpy import load_file, save_file

    d = write_qwen2_checkpoint(tmp_path / "qwen2")
    if edit_config:
        raw = json.loads((d / "config.json").read_text())
        edit_config(raw)
        (d / "config.json").write_text(json.dumps(raw))
    if drop:
        weights = load_file(str(d / "model.safetensors"))
        save_file({k: v for k, v in weights.items() if k not in drop}, str(d / "model.safetensors"))
    return d


def test_qwen2_reads_rope_theta_where_transformers_5_writes_it(tmp_path):
    """transformers 5 saves rope_theta inside rope_parameters: read there, Qwen2.5's 1e6 is not the 1e4 default."""
    def v5(raw):
        raw["rope_parameters"] = {"rope_theta": raw.pop("rope_theta"), "rope_type": "default"}
        raw["layer_types"] = ["full_attention"] * raw["num_hidden_layers"]

    backbone = load_backbone(qwen2_with(tmp_path, v5))
    assert (backbone.config.rope_theta, backbone.config.qkv_bias) == (1e6, True)


@pytest.mark.parametrize("edit, drop, message", [
    (None, ("model.layers.1.self_attn.k_proj.bias",), "missing tensor layers.1.self_attn.k_proj.bias"),
    (lambda raw: raw.update(use_sliding_window=True), (), "sliding-window attention is not supported"),
    (lambda raw: raw.update(rope_parameters={"rope_type": "yarn", "factor": 4.0}), (), "rope_parameters"),
], ids=["missing-bias", "sliding-window", "yarn"])
def test_a_qwen2_checkpoint_we_cannot_run_exactly_is_one_line(tmp_path, edit, drop, message):
    with pytest.raises(BackboneError, match=message):
        load_backbone(qwen2_with(tmp_path, edit, drop))


def test_qwen2_classifier_bundles_build_and_serve(tmp_path, toy_files):
    """Zero-shot and prefix classifier bundles on a Qwen2 checkpoint, by the real pt-build, served by pt-run serve."""
    from conftest import build
    from ptbundle.runtime import Bundle
    from serving import Server

    ckpt = write_qwen2_checkpoint(tmp_path / "qwen2")
    train, dev = toy_files
    out = tmp_path / "exports"
    common = ["--train", str(train), "--dev", str(dev), "--backbone", str(ckpt), "--max-length", "64",
              "--template", DECODER_TEMPLATE, *[x for w in WORDS for x in ("--label-text", w)], "--out", str(out)]
    build(["export", "--prompt", "hard", "--head", "zero-shot", *common, "--name", "q-zero"])
    build(["export", "--prompt", "soft", "--virtual-tokens", "4", "--epochs", "1", "--batch-size", "8", *common,
           "--name", "q-prefix"])
    texts = ["a great movie", "the worst film ever"]
    server = Server(out / "q-zero", out / "q-prefix")
    try:
        for name in ("q-zero", "q-prefix"):
            bundle = Bundle.load(out / name)
            assert bundle.manifest.backbone.model_type == "qwen2"
            assert bundle.manifest.export["onnx"] < 1e-4 and bundle.manifest.export["mindir"] < 1e-5
            status, body = server.predict(name, texts)
            assert status == 200
            for got, want in zip(body["predictions"], bundle.predict(texts)):
                assert got["label"] == want.label
                assert got["probabilities"] == pytest.approx(want.probabilities, abs=1e-5)
        assert Bundle.load(out / "q-prefix").manifest.only.prompt_method == "prefix-tuning"
    finally:
        server.stop()


def test_decoder_bundles_merge_and_each_row_reads_its_own_prompt(decoder_build, toy_files, tmp_path):
    """The decoder's zero-shot, probe and prefix bundles and a shallow prompt, merged by the real pt-build on the
    tiny Llama: every row of a shuffled mixed batch equals its own bundle's (MindSpore's graph and ONNX)."""
    from conftest import build
    from ptbundle.runtime import Bundle

    out, _ = decoder_build
    gguf = out.parent / "tiny.gguf"
    train, dev = toy_files
    build(["export", "--train", str(train), "--dev", str(dev), "--backbone", str(gguf), "--prompt", "soft",
           "--method", "prompt-tuning", "--virtual-tokens", "3", "--epochs", "1", "--batch-size", "8",
           "--max-length", "64", "--template", DECODER_TEMPLATE, *[x for w in WORDS for x in ("--label-text", w)],
           "--out", str(tmp_path), "--name", "shallow"])
    sources = {"prefix": out / "toy-soft", "zeroshot": out / "toy-hard-zeroshot", "probe": out / "toy-hard-probe",
               "shallow": tmp_path / "shallow"}
    merged_dir = tmp_path / "merged"
    build(["merge", *(f"{k}={v}" for k, v in sources.items()), "--backbone", str(gguf), "--out", str(merged_dir)])
    texts = ["a great movie", "the worst film ever", "boring acting and a weak story", "great", "a dull , weak film"]
    rng = np.random.RandomState(0)
    rows = [(name, texts[rng.randint(len(texts))]) for name in rng.choice(list(sources), 24)]
    for backend in ("onnxruntime", "mindspore"):
        merged = Bundle.load(merged_dir, backend=backend)
        got = merged.logits([t for _, t in rows], task=[n for n, _ in rows], batch_size=8)
        for (name, text), row in zip(rows, got):
            want = Bundle.load(sources[name]).logits([text])[0]
            np.testing.assert_allclose(row[: len(want)], want, atol=1e-4, err_msg=f"{backend} {name}")
    # --add re-reads the merged tasks from their rows of the tables (a shallow prompt's cache cannot be undone into
    # its prompt): the merge itself checks them unchanged to the bit, and the new task equals its own bundle.
    before = Bundle.load(merged_dir).logits(texts, task="shallow")
    build(["merge", "--add", str(merged_dir), f"again={sources['shallow']}", "--backbone", str(gguf)])
    grown = Bundle.load(merged_dir)
    assert grown.task_names == [*sources, "again"]
    assert np.array_equal(grown.logits(texts, task="shallow"), before)
    np.testing.assert_allclose(grown.logits(texts, task="again"), before, atol=1e-5)
