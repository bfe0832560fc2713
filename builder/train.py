"""The training loop: a soft prompt and a head on a frozen encoder.

Read it like nanoGPT's train.py: build the model, make the batches, run a
compiled train step, evaluate on dev after each epoch, keep the best epoch.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace

import click
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ptbundle.runtime.bundle import batched_logits
from ptbundle.runtime.metrics import classification_metrics
from ptbundle.runtime.text import batch_indices, encode, load_tokenizer, pad

from . import checkpoint
from .backbone import Backbone
from .checkpoint import Checkpoints, LoopState
from . import parallel
from .parallel import World
from .errors import DataError, RecipeError
from .model import PromptClassifier
from .prompts import PROMPTS
from .recipe import Recipe

# MindSpore's CPU backend keeps 1.5-3 GB of buffers per compiled (batch, seq)
# train graph (measured: 1.2 GB at seq 52, 2.8 GB at seq 100), so training
# pads to multiples of 16: MR then needs 5 graphs instead of 9 (20 GB, OOM).
TRAIN_PAD_MULTIPLE = 16


def build_classifier(backbone: Backbone, recipe: Recipe, num_labels: int, prompt_init: dict | None,
                     normalize: bool = False, label_rows: np.ndarray | None = None) -> PromptClassifier:
    """The model to train: frozen encoder, initial prompt (none with 0 virtual tokens), fresh head.

    A causal LM (backbone.is_decoder) gives a builder.decoder.DecoderClassifier instead, whose head starts as
    `label_rows` (the label words' rows of its LM head, builder.decoder.label_rows) with no bias, or seeded at
    random without them (a probe)."""
    if backbone.is_decoder:
        from .decoder import DecoderClassifier

        net = DecoderClassifier(backbone.build_decoder(), num_labels, recipe.prompt_spec())
        rng = np.random.RandomState(recipe.seed)
        weight = label_rows if label_rows is not None else rng.normal(0, 0.02, (num_labels, backbone.config.hidden_size))
        net.load_head_state({"classifier.weight": weight, "classifier.bias": np.zeros(num_labels),
                             **(prompt_init if recipe.virtual_tokens > 0 else {})})
        return net
    net = PromptClassifier(backbone.build_encoder(), recipe.virtual_tokens, num_labels, recipe.pooling, normalize,
                           spec=recipe.prompt_spec())
    net.set_dropout(recipe.dropout)
    rng = np.random.RandomState(recipe.seed)
    h = backbone.config.hidden_size
    values = {"classifier.weight": rng.normal(0, 0.02, (num_labels, h)), "classifier.bias": np.zeros(num_labels)}
    if recipe.virtual_tokens > 0:
        values.update(prompt_init)
    if recipe.pooling == "cls":
        pretrained = backbone.pooler_weights()
        if pretrained is not None:  # BERT: the checkpoint's pooler, frozen as in PEFT
            values["pooler.weight"], values["pooler.bias"] = pretrained
            for p in net.pooler.get_parameters():
                p.requires_grad = False
        else:  # RoBERTa's head dense is new: train it with the head
            values["pooler.weight"] = rng.normal(0, 0.02, (h, h))
            values["pooler.bias"] = np.zeros(h)
    net.load_head_state(values)
    return net


def initial_prompt(backbone: Backbone, recipe: Recipe, tokenizer, texts) -> dict:
    """Starting values of the prompt's Parameters, by name (each method says which: builder.prompts `initial`).

    Lester et al. (2021) section 2.2 for a shallow prompt: embeddings of
    frequent training tokens (`vocab`), of a text, or random.  A prefix
    starts from the keys and values those tokens get at each layer, and a
    late prompt from their states entering its layer: real activations, as
    Li & Liang (2021) found best for prefixes.  `random` is PEFT's default for
    a prefix, N(0, 1).
    """
    rng = np.random.RandomState(recipe.seed)
    n, spec = recipe.virtual_tokens, recipe.prompt_spec()
    if recipe.init == "random":
        start = RandomStart(backbone, n, rng)
    elif recipe.init == "text":
        ids = tokenizer.encode(recipe.init_text, add_special_tokens=False).ids
        if not ids:
            raise RecipeError(f"--init-text {recipe.init_text!r} has no tokens in {backbone.name}'s vocabulary")
        start = TokenStart(backbone, (ids * math.ceil(n / len(ids)))[:n])  # repeat to fill, as PEFT does
    elif recipe.init == "vocab":
        # Sample among the 5,000 most frequent tokens of the training text.
        counts = Counter(i for e in encode(tokenizer, texts) for i, s in zip(e.ids, e.special_tokens_mask) if not s)
        frequent = [i for i, _ in counts.most_common(5000)]
        start = TokenStart(backbone, list(rng.choice(frequent, n, replace=len(frequent) < n)))
    else:
        raise RecipeError(f"unknown prompt init {recipe.init!r} (vocab, text, random)")
    return {k: np.asarray(v, np.float32) for k, v in PROMPTS[spec.method].initial(spec, start).items()}


class TokenStart:
    """Starting tokens of a prompt: their embeddings, and (computed once, when a method asks) their activations."""

    def __init__(self, backbone: Backbone, ids: list):
        self.backbone, self.ids, self._activations = backbone, ids, None

    def embeddings(self) -> np.ndarray:
        return self.backbone.word_embeddings[self.ids].copy()

    def states(self, layer: int) -> np.ndarray:
        return self.activations()[0][layer]

    def keys_values(self, first: int) -> np.ndarray:
        return np.concatenate(self.activations()[1][first:], 1)

    def activations(self) -> tuple:
        if self._activations is None:
            if self.backbone.is_decoder:
                from .decoder import token_activations as decoder_activations

                self._activations = decoder_activations(self.backbone, self.ids)
            else:
                self._activations = token_activations(self.backbone, self.ids)
        return self._activations


class RandomStart:
    """TokenStart's shapes, drawn at random: embeddings at the word table's scale, activations N(0, 1) (PEFT's
    prefix init; the states a late prompt joins are layer-normalized)."""

    def __init__(self, backbone: Backbone, n: int, rng):
        self.backbone, self.n, self.rng = backbone, n, rng

    def embeddings(self) -> np.ndarray:
        table = self.backbone.word_embeddings
        return self.rng.normal(0, table.std(), (self.n, table.shape[1]))

    def states(self, layer: int) -> np.ndarray:
        return self.rng.normal(0, 1.0, (self.n, self.backbone.config.hidden_size))

    def keys_values(self, first: int) -> np.ndarray:
        cfg = self.backbone.config
        width = getattr(cfg, "kv_width", cfg.hidden_size)  # a decoder's keys are as wide as its kv heads
        return self.rng.normal(0, 1.0, (self.n, (cfg.num_layers - first) * 2 * width))


def token_activations(backbone: Backbone, ids: list) -> tuple:
    """The tokens `ids` as one sequence through the frozen encoder (numpy, float32): the states entering
    each layer [n, hidden], and each layer's keys and values side by side [n, 2 * hidden] (a prefix's layout)."""
    from math import erf

    w, cfg = backbone.parameters(), backbone.config

    def norm(x, name):
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + cfg.layer_norm_eps)
        return x * w[f"{name}.gamma"] + w[f"{name}.beta"]

    def dense(x, name):
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    n, h, heads = len(ids), cfg.hidden_size, cfg.num_heads
    x = w["embeddings.word"][ids] + w["embeddings.position"][cfg.position_offset : cfg.position_offset + n]
    if "embeddings.token_type" in w:
        x = x + w["embeddings.token_type"][0]
    x = norm(x, "embeddings.norm")
    states, keys_values = [], []
    for i in range(cfg.num_layers):
        at, ffn = f"layers.{i}.attention", f"layers.{i}.ffn"
        states.append(x.astype(np.float32))
        q, k, v = np.split(dense(x, f"{at}.qkv"), 3, -1)
        keys_values.append(np.concatenate([k, v], 1).astype(np.float32))
        split = lambda t: t.reshape(n, heads, h // heads).transpose(1, 0, 2)  # noqa: E731
        scores = split(q) @ split(k).transpose(0, 2, 1) / np.sqrt(h // heads)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        ctx = (probs / probs.sum(-1, keepdims=True)) @ split(v)
        x = norm(x + dense(ctx.transpose(1, 0, 2).reshape(n, h), f"{at}.out"), f"{at}.norm")
        up = dense(x, f"{ffn}.up")
        up = up * 0.5 * (1.0 + np.vectorize(erf)(up / np.sqrt(2.0)))
        x = norm(x + dense(up, f"{ffn}.down"), f"{ffn}.norm")
    return states, keys_values


def lr_schedule(peak: float, total: int, warmup: float) -> list:
    """Linear warmup to `peak`, then linear decay to zero."""
    warm = max(1, int(total * warmup))
    return [peak * (s + 1) / warm if s < warm else peak * max(0.0, (total - s) / max(1, total - warm))
            for s in range(total)]


def bucketed_batches(lengths, batch_size: int, rng) -> list:
    """Shuffled batches of similar length; padding then costs little.

    Sort within pools of 50 batches (not globally) so each epoch still mixes
    examples; drop the one ragged batch so every step has the same batch size
    and few shapes need compiling.
    """
    order = rng.permutation(len(lengths))
    pool = batch_size * 50
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(np.asarray(lengths)[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


class TrainStep(nn.Cell):
    """One compiled step: forward, loss, gradients of the trainable params, AdamW."""

    def __init__(self, net: PromptClassifier, recipe: Recipe, steps: int, world: World = World()):
        super().__init__(auto_prefix=False)  # keep the net's parameter names
        self.net = net
        trainable = net.trainable_params()
        # By identity, not name: MindSpore renames Parameters after the cell path.
        prompt_ids = {id(p) for p in net.prompt_params().values()} if hasattr(net, "prompt_params") else set()
        prompt = [p for p in trainable if id(p) in prompt_ids]
        head = [p for p in trainable if id(p) not in prompt_ids]
        groups = [{"params": head, "lr": lr_schedule(recipe.head_lr, steps, recipe.warmup),
                   "weight_decay": recipe.weight_decay}]
        if prompt:
            groups.append({"params": prompt, "lr": lr_schedule(recipe.prompt_lr, steps, recipe.warmup),
                           "weight_decay": 0.0})
        self.optimizer = nn.AdamWeightDecay(groups)
        self.smoothing = recipe.label_smoothing
        self.grad_fn = ms.value_and_grad(self.loss, None, self.optimizer.parameters, has_aux=True)
        # Under msrun (builder.parallel): the gradients averaged over the workers before the update.
        self.parallel = world.size > 1
        if self.parallel:
            self.reducer = nn.DistributedGradReducer(self.optimizer.parameters, mean=True)

    def loss(self, *args):
        *inputs, onehot = args
        logits = self.net(*inputs)
        target = onehot * (1.0 - self.smoothing) + self.smoothing / onehot.shape[-1]
        return -(ops.log_softmax(logits, -1) * target).sum(-1).mean(), logits

    def construct(self, *args):
        """args: what the net takes (ids, mask, types; or features for a head alone), then one-hot labels."""
        (loss, logits), grads = self.grad_fn(*args)
        if self.parallel:
            grads = self.reducer(grads)
        self.optimizer(grads)
        return loss, logits


def progress(items, label: str, status):
    """click's progress bar on a terminal; in a log, a line every 10%."""
    if sys.stderr.isatty():
        with click.progressbar(items, label=label, show_eta=True, show_pos=True, width=24,
                               item_show_func=lambda _: status(), file=sys.stderr) as bar:
            yield from bar
        return
    started, total = time.time(), len(items)
    marks = {max(1, total * k // 10) for k in range(1, 11)}
    for done, item in enumerate(items, start=1):
        yield item
        if done in marks:
            elapsed = time.time() - started
            print(f"{label}: {done}/{total} {status()} [{elapsed:.0f} s, eta {elapsed / done * (total - done):.0f} s]",
                  file=sys.stderr, flush=True)


class CellModel:
    """A MindSpore Cell called as the runtime calls a backend: int32 arrays in, float32 numpy out.

    Rows are repeated up to a fixed batch size and sequences padded to
    multiples of TRAIN_PAD_MULTIPLE, so each length compiles one graph.
    """

    pad_multiple = TRAIN_PAD_MULTIPLE

    def __init__(self, cell, batch_size: int):
        cell.set_train(False)
        self.cell, self.batch_size = cell, batch_size

    def __call__(self, *arrays) -> np.ndarray:
        n = len(arrays[0])
        filled = [np.concatenate([a, np.repeat(a[-1:], self.batch_size - n, 0)]) for a in arrays]
        return self.cell(*(Tensor(a) for a in filled)).asnumpy()[:n]


class Lower(nn.Cell):
    """A PromptClassifier's `lower` pass: the states entering the layer its prompt starts at."""

    def __init__(self, net: PromptClassifier):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, input_ids, attention_mask, token_type_ids):
        return self.net.lower(input_ids, attention_mask, token_type_ids)[0]


class Upper(nn.Cell):
    """A PromptClassifier from the layer its prompt starts at: cached states and their mask in, logits out."""

    def __init__(self, net: PromptClassifier):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, states, attention_mask):
        return self.net.head(self.net.upper_features(states, attention_mask))

    def prompt_params(self) -> dict:
        return self.net.prompt_params()


class LayerCache:
    """The states entering a prompt's first layer, computed once per text.

    The layers below a late prompt (or a prefix that starts above layer 0)
    never see it, so their output is the same every epoch: training runs
    them once here and then pays only for the layers above (Liu et al.
    2022, Late Prompt Tuning).  The texts' states are kept unpadded, one
    [tokens, hidden] float32 table (MR's 8,528 training texts with MiniLM:
    about 400 MB); past `memory_limit` bytes the table is a memory-mapped
    file in a temporary directory instead, so a large corpus costs disk,
    not RAM.
    """

    MEMORY_LIMIT = 2 << 30

    def __init__(self, net: PromptClassifier, encodings, pad_id: int, batch_size: int = 64,
                 memory_limit: int = MEMORY_LIMIT, lower=None, label: str = "lower layers"):
        """`lower`: runs net.lower as the runtime calls a model (default: the MindSpore Cell; a decoder's
        runs in onnxruntime, see inference_model)."""
        lower = lower or CellModel(Lower(net), batch_size)
        self.lengths = [len(e.ids) for e in encodings]
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])
        shape = (int(self.starts[-1]), net.hidden_size)
        if shape[0] * shape[1] * 4 > memory_limit:
            import tempfile

            self._directory = tempfile.TemporaryDirectory(prefix="ptbundle-layer-cache-")  # removed with the cache
            self.table = np.lib.format.open_memmap(f"{self._directory.name}/states.npy", "w+", np.float32, shape)
        else:
            self.table = np.empty(shape, np.float32)
        for index in progress(batch_indices(self.lengths, batch_size), label, lambda: ""):
            # onnxruntime takes any length (pad_multiple 1): padding to 16 cost SmolLM2 about 15% more tokens
            out = lower(*pad([encodings[i] for i in index], pad_id, lower.pad_multiple))
            for row, i in enumerate(index):
                self.table[self.starts[i] : self.starts[i + 1]] = out[row, : self.lengths[i]]

    def batch(self, index) -> tuple:
        """(states [b, seq, hidden] zero-padded, mask [b, seq] int32), seq a multiple of TRAIN_PAD_MULTIPLE."""
        longest = max(self.lengths[i] for i in index)
        seq = -(-longest // TRAIN_PAD_MULTIPLE) * TRAIN_PAD_MULTIPLE
        states = np.zeros((len(index), seq, self.table.shape[1]), np.float32)
        mask = np.zeros((len(index), seq), np.int32)
        for row, i in enumerate(index):
            states[row, : self.lengths[i]] = self.table[self.starts[i] : self.starts[i + 1]]
            mask[row, : self.lengths[i]] = 1
        return states, mask

    def logits(self, upper: Upper, width: int, batch_size: int = 64) -> np.ndarray:
        """upper over every cached text, [n, width] in input order."""
        model = CellModel(upper, batch_size)
        out = np.zeros((len(self.lengths), width), np.float32)
        for index in batch_indices(self.lengths, batch_size):
            out[index] = model(*self.batch(index))
        return out


class ScratchOnnx:
    """A net's ONNX graph in a temporary directory, called as the runtime calls a model.

    A decoder's forward passes outside the train step run here: MindSpore's
    CPU backend keeps GBs of buffers per compiled (batch, seq) graph, which a
    135M decoder multiplies (its layer cache over MR's training texts went
    past 17 GB and was killed), while onnxruntime takes any shape in one
    session, faster (builder.hard.FeatureCache does the same for features).
    """

    def __init__(self, net, lower: bool = False):
        import tempfile

        from ptbundle.runtime.onnx_backend import OnnxModel

        from .decoder_classifier_onnx import export_decoder_classifier

        self.directory = tempfile.TemporaryDirectory(prefix="ptbundle-forward-")
        path = f"{self.directory.name}/model.onnx"
        export_decoder_classifier(net, path, lower=lower)
        self.model = OnnxModel(path)
        self.pad_multiple = self.model.pad_multiple

    def __call__(self, *arrays):
        return self.model(*arrays)


def inference_model(net, batch_size: int = 64):
    """The model that scores `net` outside training: onnxruntime for a decoder (ScratchOnnx), else the Cell."""
    return ScratchOnnx(net) if hasattr(net, "decoder") else CellModel(net, batch_size)


def cell_logits(cell, encodings, pad_id: int, width: int, batch_size: int = 64) -> np.ndarray:
    """cell(ids, mask, types) -> [n, width] in input order, batched as the runtime batches."""
    return batched_logits(CellModel(cell, batch_size), encodings, pad_id, width, batch_size)


def evaluate(net, encodings, gold, pad_id: int, num_labels: int) -> dict:
    if not encodings:
        return {}
    predicted = batched_logits(inference_model(net), encodings, pad_id, num_labels).argmax(-1)
    return classification_metrics(predicted, gold, num_labels)


def encode_split(tokenizer, dataset, split: str, template=None):
    """(encodings, label ids) of one split, tokenized as the bundle will tokenize."""
    examples = getattr(dataset, split)
    texts_b = [e.text_b for e in examples] if dataset.is_pair else None
    return encode(tokenizer, [e.text for e in examples], texts_b, template), np.array(dataset.label_ids(examples))


@dataclass
class Fit:
    """What `fit` returns: the best epoch (on dev), its weights, the curve, and the time per step."""

    best_epoch: int
    weights: dict
    curve: list
    step_seconds: list
    seconds: float


def fit(step: TrainStep, batch_inputs, lengths, labels, num_labels: int, recipe: Recipe, dev_metrics, weights,
        log, name: str = "epoch", checkpoints: Checkpoints | None = None, world: World = World()) -> Fit:
    """The one training loop: epochs of length-bucketed batches, dev after each, the best epoch kept.

    `batch_inputs(index)` gives the Tensors the step's net takes for those
    examples (token arrays for a prompt, features for a head alone);
    `dev_metrics()` scores the current weights on dev; `weights()` snapshots
    them.  The batch order is drawn from `recipe.seed` alone, so every kind
    of model trained on the same data sees the same batches.  With
    `checkpoints`, the whole state is saved every `every` steps and after
    each epoch, and `resume` goes on from the last save (builder.checkpoint).
    In a `world` of several workers (builder.parallel) the batches are global,
    workers x batch_size examples, each worker training on its shard; only
    the leader logs and saves.
    """
    rng = np.random.RandomState(recipe.seed)
    onehot = np.eye(num_labels, dtype=np.float32)
    labels = np.asarray(labels)
    global_batch = recipe.batch_size * world.size
    steps_per_epoch = len(lengths) // global_batch
    if not world.leader:
        log, checkpoints = (lambda message: None), (None if checkpoints is None else replace(checkpoints, every=-1))
    state, best, epoch_rng = LoopState(), None, None
    if checkpoints is not None and checkpoints.resume:
        state, epoch_rng, best_weights = checkpoint.load(checkpoints, step.optimizer)
        rng.set_state(epoch_rng)
        best = (state.best_epoch, best_weights) if best_weights is not None else None
        log(f"resuming {name} {state.epoch}/{recipe.epochs} after {state.steps} steps ({checkpoints.path})")
    started = time.time() - state.seconds
    for epoch in range(state.epoch, recipe.epochs + 1):
        step.set_train(True)
        epoch_rng = rng.get_state()
        batches = bucketed_batches(lengths, global_batch, rng)
        if state.batch == 0:
            state.epoch, state.loss_sum, state.seen, state.correct = epoch, 0.0, 0, 0
        stats = {}
        for index in progress(batches[state.batch :], f"{name} {epoch}/{recipe.epochs}", lambda: stats.get("text", "")):
            index = world.shard(index)
            inputs, y = batch_inputs(index), labels[index]
            t0 = time.perf_counter()
            loss, logits = step(*inputs, Tensor(onehot[y]))
            state.loss_sum += float(loss.asnumpy()) * len(index)
            state.step_seconds.append(time.perf_counter() - t0)
            state.correct += int((logits.asnumpy().argmax(-1) == y).sum())
            state.seen += len(index)
            state.batch += 1
            state.steps += 1
            stats["text"] = f"loss {state.loss_sum / state.seen:.3f} acc {state.correct / state.seen:.3f}"
            if checkpoints is not None and checkpoints.every > 0 and state.steps % checkpoints.every == 0 \
                    and state.batch < len(batches):
                state.seconds = time.time() - started
                checkpoint.save(checkpoints, step.optimizer, state, epoch_rng, best[1] if best else None)
            checkpoint.maybe_die(state.steps, world.rank)
        dev = dev_metrics()
        point = {"epoch": epoch, "step": epoch * steps_per_epoch, "train_loss": state.loss_sum / state.seen,
                 "train_accuracy": state.correct / state.seen, "dev": dev, "seconds": round(time.time() - started, 1)}
        state.curve.append(point)
        log(f"{name} {epoch}: train loss {point['train_loss']:.4f} acc {point['train_accuracy']:.4f}, "
            f"dev acc {dev['accuracy']:.4f} macro-F1 {dev['macro_f1']:.4f} ({point['seconds']:.0f} s)")
        if dev["accuracy"] > state.best_dev:
            state.best_dev, best = dev["accuracy"], (epoch, weights())
            state.best_epoch = epoch
        state.epoch, state.batch = epoch + 1, 0
        if checkpoints is not None and checkpoints.every >= 0 and epoch < recipe.epochs:
            state.seconds = time.time() - started
            checkpoint.save(checkpoints, step.optimizer, state, rng.get_state(), best[1])
    return Fit(best[0], best[1], state.curve, state.step_seconds, round(time.time() - started, 1))


@dataclass
class Prepared:
    """Everything training a prompt needs, made once: tokenizer, encoded splits, the net, its shape."""

    tokenizer: object
    splits: dict  # split -> (encodings, label ids)
    net: PromptClassifier
    pad_id: int
    num_labels: int


def prepare(backbone: Backbone, dataset, recipe: Recipe, template=None, label_words: dict | None = None) -> Prepared:
    """Tokenize every split as the bundle will, and build the net with its initial prompt and head.

    A decoder reads its inputs through `template` (its answer slot at the end) and starts its head from
    `label_words` (label -> words, builder.decoder.label_rows)."""
    tokenizer = load_tokenizer(backbone.tokenizer_path, recipe.max_length)
    splits = {name: encode_split(tokenizer, dataset, name, template) for name in ("train", "dev", "test")}
    if len(splits["train"][0]) < recipe.batch_size:
        raise DataError(f"{len(splits['train'][0])} training examples, fewer than one batch of {recipe.batch_size}"
                        f" (lower --batch-size)")
    num_labels = len(dataset.labels)
    prompt_init = initial_prompt(backbone, recipe, tokenizer, [e.text for e in dataset.train]) \
        if recipe.virtual_tokens > 0 else None
    rows = None
    if backbone.is_decoder and label_words:
        from .decoder import label_rows

        rows = label_rows(backbone, tokenizer, label_words, dataset.labels)
    net = build_classifier(backbone, recipe, num_labels, prompt_init, label_rows=rows)
    return Prepared(tokenizer, splits, net, backbone.config.pad_token_id, num_labels)


def train(backbone: Backbone, dataset, recipe: Recipe, log=print, checkpoints: Checkpoints | None = None,
          template=None, label_words: dict | None = None):
    """Train; return (net with the best dev epoch's weights, curve, metrics).

    `checkpoints` (its fingerprint left empty: this fills it in from the recipe, data and backbone);
    `template`, `label_words`: a decoder's (prepare)."""
    ms.set_seed(recipe.seed)
    run = prepare(backbone, dataset, recipe, template, label_words)
    net, pad_id = run.net, run.pad_id
    train_enc, train_y = run.splits["train"]
    world = parallel.world()
    steps = len(train_enc) // (recipe.batch_size * world.size) * recipe.epochs
    if checkpoints is not None:
        checkpoints = replace(checkpoints, fingerprint=checkpoint.fingerprint(
            recipe.to_json(), backbone.sha256, [e.ids for e in train_enc], train_y.tolist()))
    if net.split > 0:  # the prompt starts above layer 0: the layers below run once per text (LayerCache)
        started = time.time()
        lower = ScratchOnnx(net, lower=True) if hasattr(net, "decoder") else None
        # A decoder scores dev through the whole net in onnxruntime (below), so only its training texts are cached.
        splits = ("train",) if lower is not None else ("train", "dev")
        caches = {split: LayerCache(net, run.splits[split][0], pad_id, lower=lower,
                                    label=f"layers 0-{net.split - 1}, {split}") for split in splits}
        del lower
        gc.collect()
        log(f"layers 0-{net.split - 1} computed once for "
            + " and ".join(f"{len(run.splits[split][0])} {split}" for split in splits)
            + f" texts ({time.time() - started:.0f} s); training layers {net.split}-{net.layer_count - 1}")
        upper = Upper(net)
        step = TrainStep(upper, recipe, steps, world)
        batch_inputs = lambda index: [Tensor(a) for a in caches["train"].batch(index)]  # noqa: E731
        if "dev" in caches:
            dev_metrics = lambda: classification_metrics(  # noqa: E731
                caches["dev"].logits(upper, run.num_labels).argmax(-1), run.splits["dev"][1], run.num_labels)
        else:  # the whole net in onnxruntime (ScratchOnnx): no MindSpore graphs per shape
            dev_metrics = lambda: evaluate(net, *run.splits["dev"], pad_id, run.num_labels)  # noqa: E731
    else:
        step = TrainStep(net, recipe, steps, world)
        batch_inputs = lambda index: [Tensor(a) for a in pad([train_enc[i] for i in index], pad_id,  # noqa: E731
                                                             TRAIN_PAD_MULTIPLE)]
        dev_metrics = lambda: evaluate(net, *run.splits["dev"], pad_id, run.num_labels)  # noqa: E731
    result = fit(step, batch_inputs, [len(e.ids) for e in train_enc], train_y, run.num_labels, recipe, dev_metrics,
                 net.head_state, log, checkpoints=checkpoints, world=world)
    # The compiled train graphs hold GBs of buffers (see TRAIN_PAD_MULTIPLE);
    # drop them before evaluation and export compile graphs of their own.
    del step
    gc.collect()
    net.load_head_state(result.weights)
    dev = result.curve[result.best_epoch - 1]["dev"]
    if net.split > 0 and not hasattr(net, "decoder"):  # scored from cached layers: again through the whole net
        dev = evaluate(net, *run.splits["dev"], pad_id, run.num_labels)
    metrics = {"best_epoch": result.best_epoch, "dev": dev,
               "test": evaluate(net, *run.splits["test"], pad_id, run.num_labels),
               "train_seconds": result.seconds,
               # the median leaves out the steps that compiled a new shape
               "seconds_per_step_median": round(float(np.median(result.step_seconds)), 3),
               "steps": len(result.step_seconds)}
    if world.size > 1:
        metrics["workers"] = world.size  # each trained on --batch-size of every global batch
    return net, result.curve, metrics
