"""Training on a tiny random checkpoint: only the prompt and head move, and they learn."""

import numpy as np
import pytest

from conftest import toy_rows
from ptbundle.builder.backbones.backbone import load_backbone
from ptbundle.runtime.data import Dataset, Example
from ptbundle.builder.recipe import Recipe
from mindspore import Tensor

from ptbundle.builder.training.forward import Lower, Upper
from ptbundle.builder.training.loop import TrainStep, bucketed_batches, lr_schedule
from ptbundle.builder.families import family_of
from ptbundle.builder.training.init import initial_prompt
from ptbundle.builder.training.classifier import train
from ptbundle.runtime.bundle import softmax
from ptbundle.runtime.text import encode, load_tokenizer, pad


def toy_dataset(pair=False):
    def examples(rows):
        return [Example(t, l, "the film" if pair else None) for t, l in rows]

    return Dataset("toy", ("neg", "pos"), examples(toy_rows(64)), examples(toy_rows(24, 1)), examples(toy_rows(24, 2)))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_training_moves_prompt_and_head_only_and_learns(tiny_bert, pooling):
    backbone = load_backbone(tiny_bert)
    frozen = {k: v.copy() for k, v in backbone.weights.items()}
    recipe = Recipe(virtual_tokens=4, pooling=pooling, epochs=6, batch_size=8, prompt_lr=0.05, head_lr=0.05)
    net, curve, metrics = train(backbone, toy_dataset(), recipe, log=lambda m: None)

    assert [p["epoch"] for p in curve] == [1, 2, 3, 4, 5, 6]
    assert curve[-1]["train_loss"] < curve[0]["train_loss"] / 2
    assert metrics["dev"]["accuracy"] >= 0.85  # chance is 0.5; the toy task hinges on one word
    assert metrics["test"]["n"] == 24 and metrics["steps"] == 6 * (64 // 8)
    # the encoder inside the net is exactly the checkpoint
    encoder_word = net.encoder.embeddings.word.asnumpy()
    np.testing.assert_array_equal(encoder_word, frozen["embeddings.word_embeddings.weight"])
    qkv = net.encoder.layers[1].attention.qkv.weight.asnumpy()
    np.testing.assert_array_equal(qkv[:32], frozen["encoder.layer.1.attention.self.query.weight"])
    if pooling == "cls":  # BERT's pretrained pooler stays frozen, as in PEFT
        np.testing.assert_array_equal(net.head_state()["pooler.weight"], frozen["pooler.dense.weight"])
    assert not np.allclose(net.head_state()["prompt_embeddings"],
                           initial_prompt(backbone, recipe, load_tokenizer(backbone.tokenizer_path, 128),
                                          [e.text for e in toy_dataset().train])["prompt_embeddings"])


def test_best_epoch_weights_are_kept(tiny_bert):
    backbone = load_backbone(tiny_bert)
    recipe = Recipe(virtual_tokens=2, epochs=2, batch_size=8, prompt_lr=0.05, head_lr=0.05)
    net, curve, metrics = train(backbone, toy_dataset(), recipe, log=lambda m: None)
    best = max(curve, key=lambda p: p["dev"]["accuracy"])
    assert metrics["best_epoch"] == best["epoch"]
    assert metrics["dev"] == best["dev"]


def test_sentence_pairs_train(tiny_roberta):
    recipe = Recipe(virtual_tokens=2, epochs=1, batch_size=8, prompt_lr=0.05, head_lr=0.05)
    net, curve, metrics = train(load_backbone(tiny_roberta), toy_dataset(pair=True), recipe, log=lambda m: None)
    assert np.isfinite(curve[0]["train_loss"])


def test_prompt_initialisations(tiny_bert):
    backbone = load_backbone(tiny_bert)
    table = backbone.weights["embeddings.word_embeddings.weight"]
    tokenizer = load_tokenizer(backbone.tokenizer_path, 128)
    texts = ["a great movie", "the film"]

    shallow = dict(method="prompt-tuning")
    vocab = initial_prompt(backbone, Recipe(virtual_tokens=5, **shallow), tokenizer, texts)["prompt_embeddings"]
    ids = {tokenizer.token_to_id(w) for w in "a great movie the film".split()}
    assert all(any(np.array_equal(row, table[i]) for i in ids) for row in vocab)

    text = initial_prompt(backbone, Recipe(virtual_tokens=5, init="text", init_text="great movie", **shallow), tokenizer,
                          texts)["prompt_embeddings"]
    g, m = tokenizer.token_to_id("great"), tokenizer.token_to_id("movie")
    np.testing.assert_array_equal(text, table[[g, m, g, m, g]])  # repeated to fill, as PEFT does

    rand = initial_prompt(backbone, Recipe(virtual_tokens=50, init="random", **shallow), tokenizer,
                          texts)["prompt_embeddings"]
    assert rand.shape == (50, 32) and abs(rand.std() - table.std()) < 0.05

    # a prefix starts from those tokens' keys and values at each layer, a late prompt from their states there
    prefix = initial_prompt(backbone, Recipe(method="prefix-tuning", virtual_tokens=5, init="text",
                                             init_text="great movie"), tokenizer, texts)["prompt_embeddings"]
    late = initial_prompt(backbone, Recipe(method="late-prompt", layer=1, virtual_tokens=5, init="text",
                                           init_text="great movie"), tokenizer, texts)["prompt_embeddings"]
    assert prefix.shape == (5, 2 * 2 * 32) and late.shape == (5, 32)
    assert not np.allclose(late, table[[g, m, g, m, g]])  # states after a layer, not embeddings
    random_prefix = initial_prompt(backbone, Recipe(method="prefix-tuning", virtual_tokens=50, init="random"),
                                   tokenizer, texts)["prompt_embeddings"]
    assert abs(random_prefix.std() - 1.0) < 0.05  # PEFT's nn.Embedding default

    with pytest.raises(ValueError, match="--init text needs --init-text"):
        initial_prompt(backbone, Recipe(init="text"), tokenizer, texts)


def test_bucketed_batches_cover_every_example_once_with_similar_lengths():
    rng = np.random.RandomState(0)
    lengths = rng.randint(5, 60, 1000)
    batches = bucketed_batches(lengths, 32, np.random.RandomState(1))
    flat = np.concatenate(batches)
    assert all(len(b) == 32 for b in batches)  # one shape per length bucket
    assert len(flat) == len(set(flat)) == 1000 // 32 * 32
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    assert spread < 5  # random batches would spread over ~50 tokens


def test_lr_schedule_warms_up_then_decays_to_zero():
    s = lr_schedule(1.0, 100, 0.1)
    assert len(s) == 100 and s[9] == pytest.approx(1.0) and max(s) == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(s[:10], s[1:10])) and all(a >= b for a, b in zip(s[10:], s[11:]))
    assert s[-1] == pytest.approx(0.0, abs=0.02)


def test_layer_norm_input_gradient_and_gelu_match_mindspores_own():
    """The encoder's hand-written LayerNorm backward and erf GELU give what nn.LayerNorm and ops.gelu give."""
    import mindspore as ms
    from mindspore import Tensor, nn, ops

    from ptbundle.builder.models.encoder import FrozenLayerNorm, gelu

    rng = np.random.RandomState(0)
    x = rng.normal(0, 3, (3, 5, 16)).astype(np.float32)
    x[0, 0, :4] = [0.0, 1e-6, -40.0, 12.0]  # gelu's flat ends and its middle
    weights = Tensor(rng.normal(0, 1, x.shape).astype(np.float32))  # a loss that weighs every output
    gamma, beta = rng.normal(1, 0.2, 16).astype(np.float32), rng.normal(0, 0.2, 16).astype(np.float32)
    reference_norm, norm = nn.LayerNorm((16,), epsilon=1e-12), FrozenLayerNorm(16, 1e-12)
    for cell in (reference_norm, norm):
        cell.gamma.set_data(Tensor(gamma))
        cell.beta.set_data(Tensor(beta))

    class Loss(nn.Cell):
        def __init__(self, f):
            super().__init__()
            self.f = f

        def construct(self, x):
            return (self.f(x) * weights).sum()

    class ReferenceGelu(nn.Cell):
        def construct(self, x):
            return ops.gelu(x, approximate="none")

    class Gelu(nn.Cell):
        def construct(self, x):
            return gelu(x)

    for reference, mine in ((reference_norm, norm), (ReferenceGelu(), Gelu())):
        np.testing.assert_allclose(mine(Tensor(x)).asnumpy(), reference(Tensor(x)).asnumpy(), atol=1e-6)
        expected = ms.grad(Loss(reference))(Tensor(x)).asnumpy()
        np.testing.assert_allclose(ms.grad(Loss(mine))(Tensor(x)).asnumpy(), expected, atol=1e-5)
        assert np.abs(expected).max() > 0.5  # the gradient is not trivially zero


@pytest.mark.parametrize("method", ["prefix-tuning", "late-prompt"])
def test_dropout_acts_while_training_only(tiny_bert, method):
    """--dropout drops at BERT's places in a train graph; an inference graph is the net without it.  A late
    prompt trains through builder.train.Upper on cached states: that path drops too."""
    backbone = load_backbone(tiny_bert)
    tokenizer = load_tokenizer(backbone.tokenizer_path, 128)
    texts = ["a great movie", "the film was dull and long", "fine"]
    layer = 1 if method == "late-prompt" else 0

    def net(dropout):
        recipe = Recipe(method=method, layer=layer, virtual_tokens=3, dropout=dropout)
        return family_of(backbone).classifier(backbone, recipe, 2, initial_prompt(backbone, recipe, tokenizer, texts))

    inputs = [Tensor(a) for a in pad(encode(tokenizer, texts), backbone.config.pad_token_id, 16)]
    plain, dropped = net(0.0), net(0.3)
    if method == "late-prompt":  # what training runs: layer 0 once (eval mode), the layers above in the step
        states = Lower(plain)
        states.set_train(False)
        inputs = [states(*inputs), inputs[1]]
        plain, dropped = Upper(plain), Upper(dropped)
    plain.set_train(False)
    dropped.set_train(True)
    first, second = dropped(*inputs).asnumpy(), dropped(*inputs).asnumpy()
    assert not np.allclose(first, second)  # a new mask each step
    dropped.set_train(False)
    np.testing.assert_array_equal(dropped(*inputs).asnumpy(), plain(*inputs).asnumpy())


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_label_smoothing_is_the_loss_the_step_minimises(tiny_bert, smoothing):
    """The step's loss is the cross-entropy against (1 - x) on the gold label plus x shared by all labels,
    computed here in numpy from the logits the step returns (its forward pass, before the update)."""
    backbone = load_backbone(tiny_bert)
    tokenizer = load_tokenizer(backbone.tokenizer_path, 128)
    texts = ["a great movie", "the film was dull and long", "fine", "awful"]
    recipe = Recipe(virtual_tokens=3, label_smoothing=smoothing)
    net = family_of(backbone).classifier(backbone, recipe, 3, initial_prompt(backbone, recipe, tokenizer, texts))
    inputs = [Tensor(a) for a in pad(encode(tokenizer, texts), backbone.config.pad_token_id, 16)]
    gold = np.array([0, 2, 1, 2])
    loss, logits = TrainStep(net, recipe, steps=10)(*inputs, Tensor(np.eye(3, dtype=np.float32)[gold]))
    log_p = np.log(softmax(logits.asnumpy().astype(np.float64)))
    target = np.eye(3)[gold] * (1 - smoothing) + smoothing / 3
    np.testing.assert_allclose(float(loss.asnumpy()), -(log_p * target).sum(-1).mean(), rtol=1e-5)
    if smoothing:  # the smoothed loss is not the plain one
        assert abs(float(loss.asnumpy()) + log_p[np.arange(4), gold].mean()) > 1e-4
