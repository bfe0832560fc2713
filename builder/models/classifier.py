"""Classifiers over the frozen encoder: `PromptClassifier` (one prompt method + pooling + linear head) and
`MultiTaskClassifier` (a prompt and head per task, chosen per row), with `HeadState`, the trained part as
named arrays, which the decoder's classifier shares."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from ..errors import RecipeError
from .encoder import Encoder, TrainDropout, attention_bias
from .pooling import POOLING
from .prompts import PROMPTS, PromptSpec


class HeadState:
    """The trained part of a classifier as named arrays: `head_params()` (prompt and head, under stable names)
    read and written as numpy, the prompt folded for inference.  PromptClassifier and the decoder's
    DecoderClassifier (builder.models.decoder) share it; each says what its head_params and prompt are."""

    task_count = 1  # tasks the graph serves (a MultiTaskClassifier's task_ids pick among several)

    def prompt_params(self) -> dict:
        """The prompt's Parameters (trained at the prompt's learning rate)."""
        return self.prompt.params()

    def folded_state(self) -> dict:
        """head_state with the prompt as the inference graph holds it (a prefix's reparameterization applied)."""
        state = self.head_state()
        for name in self.prompt.params():
            state.pop(name)
        return {**state, **self.prompt.folded()}

    def head_state(self) -> dict:
        """head_params as numpy arrays (copies)."""
        return {k: v.asnumpy().copy() for k, v in self.head_params().items()}

    def load_head_state(self, values: dict) -> None:
        targets = self.head_params()
        for name, value in values.items():
            if name not in targets:
                raise KeyError(f"{name} is not part of this model's head (has {', '.join(targets)})")
            value = np.asarray(value, np.float32)
            if value.shape != tuple(targets[name].shape):
                raise ValueError(f"{name}: shape {value.shape}, the model expects {tuple(targets[name].shape)}")
            targets[name].set_data(Tensor(value))


class PromptClassifier(HeadState, nn.Cell):
    """Prompt + frozen encoder + pooling + linear head.

    inputs:  input_ids, attention_mask, token_type_ids  (int32, [batch, seq])
    output:  logits [batch, num_labels]

    The prompt is one of builder.models.prompts (`spec.method`; by default a
    shallow prompt of `num_virtual_tokens`, none with 0: a plain classifier
    over the text as tokenized, used for hard prompts).  The forward pass is
    `lower` (embeddings and the layers below the prompt's first layer, which
    never see the prompt) then `upper_features`; training with a prompt that
    starts above layer 0 caches `lower` once per text (builder.training).  With
    `normalize`, the pooled vector is scaled to unit length before the head:
    a head whose rows are unit label embeddings then computes cosine
    similarities (the zero-shot verbalizer head).
    """

    family = "encoder"  # builder.families

    def __init__(self, encoder: Encoder, num_virtual_tokens: int, num_labels: int, pooling: str,
                 normalize: bool = False, spec: PromptSpec | None = None):
        super().__init__()
        if pooling not in POOLING:
            raise RecipeError(f"pooling {pooling!r} is not one of {', '.join(POOLING)}")
        h = encoder.config.hidden_size
        self.encoder = encoder
        self.spec = spec or PromptSpec.of(None, num_virtual_tokens)
        self.num_virtual_tokens = self.spec.virtual_tokens
        self.pooling = pooling
        self.normalize = normalize
        self.prompt_method = self.spec.method
        self.prompt = PROMPTS[self.spec.method](encoder.config, self.spec)  # builder.models.prompts
        self.split = self.prompt.first_layer
        self.layer_count = encoder.config.num_layers
        self.hidden_size = h
        self.pooler = POOLING[pooling](h, self.prompt.virtual_tokens)
        self.head_dropout = TrainDropout()  # BertForSequenceClassification's, before the head (set_dropout)
        self.classifier = nn.Dense(h, num_labels)

    def construct(self, input_ids, attention_mask, token_type_ids):
        return self.head(self.features(input_ids, attention_mask, token_type_ids))

    def head(self, features):
        return self.classifier(self.head_dropout(features))

    def set_dropout(self, p: float) -> None:
        """Training-time dropout in the encoder and before the head (Encoder.set_dropout)."""
        self.encoder.set_dropout(p)
        self.head_dropout.set_rate(p)

    def features(self, input_ids, attention_mask, token_type_ids):
        """The pooled vector the head reads (unit length with `normalize`)."""
        states, mask = self.lower(input_ids, attention_mask, token_type_ids)
        return self.upper_features(states, mask)

    def lower(self, input_ids, attention_mask, token_type_ids):
        """(states entering layer `split`, their mask): the part of the pass a late prompt never changes."""
        embeds = ops.gather(self.encoder.embeddings.word, input_ids, 0)
        embeds, mask, types = self.prompt(embeds, attention_mask, token_type_ids)
        x = self.encoder.embeddings(embeds, types, self.prompt.position_shift)
        if self.split > 0:
            mask_bias = attention_bias(mask)
            for i in range(self.split):
                x = self.encoder.layers[i](x, mask_bias)
        return x, mask

    def upper_features(self, x, mask):
        """The layers from `split` on, with the prompt, and the pooling: states and their mask in, pooled out."""
        b = x.shape[0]
        x, mask = self.prompt.enter(self.split, x, mask)  # a late prompt joins here (split is its layer)
        table = self.prompt.table()
        if self.prompt.has_keys_values:  # a prefix: P keys every position may attend to
            keys_mask = ops.concat((ops.ones((b, self.num_virtual_tokens), mask.dtype), mask), 1)
            mask_bias = attention_bias(keys_mask)
        else:
            mask_bias = attention_bias(mask)
        for i in range(self.split, self.layer_count):
            if self.prompt.has_keys_values:
                keys, values = self.prompt.keys_values(table, i, b)
                x = self.encoder.layers[i](x, mask_bias, keys, values)
            else:
                x = self.encoder.layers[i](x, mask_bias)
        pooled = self.pool(x, mask[:, self.prompt.virtual_tokens :])
        return unit_length(pooled) if self.normalize else pooled

    def head_params(self) -> dict:
        """The Parameters that are not the frozen encoder's, under stable names.

        MindSpore renames Parameters after their cell path (and again when a
        Cell is wrapped, e.g. by a train step), so the bundle and checkpoints
        use these names instead: `prompt_embeddings` (PEFT's key), `pooler.*`,
        `classifier.*`.
        """
        return {"classifier.weight": self.classifier.weight, "classifier.bias": self.classifier.bias,
                **self.prompt.params(), **self.pooler.params()}

    def folded(self) -> "PromptClassifier":
        """The inference net: this one, or with a prefix's reparameterization replaced by its table."""
        if not self.spec.projection:
            return self
        net = PromptClassifier(self.encoder, self.num_virtual_tokens, self.classifier.weight.shape[0], self.pooling,
                               self.normalize, spec=self.spec.folded())
        net.load_head_state(self.folded_state())
        return net

    def pool(self, hidden, attention_mask):
        return self.pooler(hidden, attention_mask)  # builder.models.pooling


def unit_length(x):
    """Rows scaled to unit L2 norm (the zero-shot head's cosine similarity)."""
    return x / ops.maximum(ops.sqrt((x * x).sum(-1, keepdims=True)), 1e-12)


@dataclass(frozen=True)
class TaskHead:
    """What MultiTaskClassifier needs to know of one task: its prompt length and its head."""

    name: str
    num_virtual_tokens: int
    num_labels: int
    pooling: str
    normalize: bool


class TaskHeadCell(nn.Cell):
    """One task's pooling and linear head, its logits padded with zeros to the widest task's."""

    def __init__(self, hidden: int, spec: TaskHead, offset: int, width: int):
        super().__init__()
        self.pooler = POOLING[spec.pooling](hidden, spec.num_virtual_tokens, offset)
        self.classifier = nn.Dense(hidden, spec.num_labels)
        self.normalize = spec.normalize
        self.padding = width - spec.num_labels

    def construct(self, states, attention_mask):
        pooled = self.pooler(states, attention_mask)
        if self.normalize:
            pooled = unit_length(pooled)
        logits = self.classifier(pooled)
        if self.padding > 0:
            logits = ops.concat((logits, ops.zeros((logits.shape[0], self.padding), logits.dtype)), 1)
        return logits


class MultiTaskClassifier(nn.Cell):
    """Several tasks' prompts and heads on one frozen encoder, each row of a batch its own task.

    inputs:  input_ids, attention_mask, token_type_ids  (int32, [batch, seq]), task_ids (int32, [batch])
    output:  logits [batch, widest task's labels]; a row's own labels first, zeros after

    Every row gets `P` prompt slots, P the longest prompt: a task's prompt
    fills the last of them (right-aligned against the text) and the slots
    before it are masked out.  Positions are per row and start at the first
    slot the row uses, so each row sees exactly what its own bundle's graph
    sees (PEFT's positions: the prompt counts, masked slots do not): the
    masked keys get exp(-1e9) = 0 weight, and the merge checks each task's
    rows against its source bundle's graph (builder.pipelines.merge).  Every head runs
    on every row (a head is one small GEMM); the row's task picks its logits.
    """

    family = "encoder"  # builder.families
    spec = None  # one prompt per task (specs), not one for the graph

    def __init__(self, encoder: Encoder, tasks: list):
        super().__init__()
        cfg = encoder.config
        h = cfg.hidden_size
        self.encoder = encoder
        self.specs = tuple(tasks)
        self.task_count = len(self.specs)
        p = max(t.num_virtual_tokens for t in tasks)
        self.virtual_tokens = p
        shifts = [p - t.num_virtual_tokens for t in tasks]  # masked slots in front of each task's prompt
        if p > 0:
            self.prompts = Parameter(np.zeros((len(tasks), p, h), np.float32), name="prompts")
            self.prefix_mask = Tensor(np.array([[0] * s + [1] * (p - s) for s in shifts], np.int32))
        self.shift = Tensor(np.array(shifts, np.int32))
        room = cfg.max_positions - cfg.position_offset
        self.room = room
        self.position_offset = cfg.position_offset
        self.slot_index = Tensor(np.arange(p + room, dtype=np.int32))
        self.task_index = Tensor(np.arange(len(tasks), dtype=np.int32))
        width = max(t.num_labels for t in tasks)
        self.heads = nn.CellList([TaskHeadCell(h, t, s, width) for t, s in zip(tasks, shifts)])

    def construct(self, input_ids, attention_mask, token_type_ids, task_ids):
        b, s = input_ids.shape
        emb = self.encoder.embeddings
        x = ops.gather(emb.word, input_ids, 0)
        mask, types = attention_mask, token_type_ids
        if self.virtual_tokens > 0:
            p = self.virtual_tokens
            x = ops.concat((ops.gather(self.prompts, task_ids, 0), x), 1)
            mask = ops.concat((ops.gather(self.prefix_mask, task_ids, 0), mask), 1)
            types = ops.concat((ops.zeros((b, p), types.dtype), types), 1)
        slots = self.slot_index[: self.virtual_tokens + s].expand_dims(0)
        # Masked slots (and padding past a short task's room) get any valid row: their states are never read.
        positions = ops.minimum(ops.maximum(slots - ops.gather(self.shift, task_ids, 0).expand_dims(1), 0),
                                self.room - 1) + self.position_offset
        x = emb.finish(x + ops.gather(emb.position, positions, 0), types)
        states = self.encoder.run_layers(x, mask)
        logits = ()
        for head in self.heads:
            logits = logits + (head(states, attention_mask),)
        chosen = (task_ids.expand_dims(1) == self.task_index.expand_dims(0)).astype(ms.float32)  # [b, tasks]
        return (ops.stack(logits, 1) * chosen.expand_dims(2)).sum(1)

    def task_params(self, i: int) -> dict:
        """Task i's head Parameters under the names of a one-task bundle's prompt.safetensors."""
        head = self.heads[i]
        return {"classifier.weight": head.classifier.weight, "classifier.bias": head.classifier.bias,
                **head.pooler.params()}

    def load_task(self, i: int, values: dict) -> None:
        """Task i's prompt and head from a one-task bundle's prompt.safetensors."""
        values = dict(values)
        n = self.specs[i].num_virtual_tokens
        prompt = values.pop("prompt_embeddings", None)
        if (prompt is None) != (n == 0) or (prompt is not None and prompt.shape[0] != n):
            raise ValueError(f"task {self.specs[i].name}: prompt_embeddings do not match {n} virtual tokens")
        if prompt is not None:
            table = self.prompts.asnumpy()
            table[i, self.virtual_tokens - n :] = prompt
            self.prompts.set_data(Tensor(table))
        targets = self.task_params(i)
        if set(values) != set(targets):
            raise ValueError(f"task {self.specs[i].name}: head has {sorted(values)}, expected {sorted(targets)}")
        for name, value in values.items():
            targets[name].set_data(Tensor(np.asarray(value, np.float32)))

    def head_state(self) -> dict:
        """Every task's prompt and head, keyed "<task>/<name>" (names as in a one-task bundle), as numpy."""
        out = {}
        table = self.prompts.asnumpy() if self.virtual_tokens > 0 else None
        for i, spec in enumerate(self.specs):
            if spec.num_virtual_tokens:
                out[f"{spec.name}/prompt_embeddings"] = table[i, self.virtual_tokens - spec.num_virtual_tokens :].copy()
            out.update({f"{spec.name}/{k}": v.asnumpy().copy() for k, v in self.task_params(i).items()})
        return out


class Features(nn.Cell):
    """A classifier's pooled vectors: what its head reads."""

    def __init__(self, net: PromptClassifier):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, input_ids, attention_mask, token_type_ids):
        return self.net.features(input_ids, attention_mask, token_type_ids)


class HeadOnly(nn.Cell):
    """A classifier's head on precomputed features: trains a probe without re-running the frozen encoder."""

    def __init__(self, net: PromptClassifier):
        super().__init__(auto_prefix=False)
        self.classifier = net.classifier

    def construct(self, features):
        return self.classifier(features)

    def prompt_params(self) -> dict:
        return {}  # a head alone: no prompt
