"""Classifiers over the frozen encoder: `PromptClassifier` (one prompt method + pooling + linear head) and
`MultiTaskClassifier` (a prompt and head per task, chosen per row), with `HeadState`, the trained part as
named arrays, which the decoder's classifier shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ..errors import RecipeError
from .encoder import Encoder, TrainDropout, attention_bias
from .pooling import POOLING
from .prompts import PROMPTS, PrefixTuning, PromptSpec


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
    """What MultiTaskClassifier needs to know of one task: its prompt (folded spec), pooling and head."""

    name: str
    spec: PromptSpec
    num_labels: int
    pooling: str
    normalize: bool


class TaskTableError(ValueError):
    """A task's prompt or head does not fit the task tables; `task` names it (pt-build merge names its source)."""

    def __init__(self, task: str, message: str):
        super().__init__(f"task {task}: {message}")
        self.task = task


class TableShape(NamedTuple):
    """The task tables' sizes, all derived from the tasks: prompt slots in front of the text (S), prefix keys in
    front of each layer's own (Q), logits width, the first layer with prefix keys (layers: none)."""

    slots: int
    past: int
    width: int
    past_from: int


def table_shape(config, tasks: list) -> TableShape:
    """An encoder's TableShape of `tasks` (TaskHead): what task_tables lays out."""
    roles = [PROMPTS[t.spec.method].table_role for t in tasks]
    return TableShape(
        max([t.spec.virtual_tokens for t, r in zip(tasks, roles) if r in ("embedded", "entered")], default=0),
        max([t.spec.virtual_tokens for t, r in zip(tasks, roles) if r == "past"], default=0),
        max(t.num_labels for t in tasks),
        min([t.spec.layer for t, r in zip(tasks, roles) if r == "past"], default=config.num_layers))


def pooling_kinds(tasks: list) -> tuple:
    """The poolings the tasks use, in POOLING's order: task.pooling's values index it."""
    return tuple(sorted({t.pooling for t in tasks}, key=list(POOLING).index))


def task_tables(config, tasks: list, values: list) -> dict:
    """Every task's prompt and head as stacked arrays, one row per task (`tasks`: TaskHead; `values`: each task's
    folded prompt and head as a one-task bundle's prompt.safetensors holds them).  Names are the graphs' own.

    A row's sequence is S slots then its text; S is the longest prompt that has states (embedded or entered).
    A prompt's P vectors fill the last P slots, right-aligned against the text; the slots before it are masked.
    A prefix's keys and values are `past` in front of each layer's own: Q of them, Q the longest prefix, each
    right-aligned too.  `visible` [T, layers, Q + S] says which of them a row's keys include at each layer;
    `text_start` the position of each row's first state in slot 0's place (positions count from a task's first
    prompt slot; a prefix shifts the text by its length, as PEFT's does); `first` the state a first-token
    pooling reads; `enters` [T, layers] where an entered prompt replaces the slots' states.  Sizes: table_shape.
    """
    layers, h, heads = config.num_layers, config.hidden_size, config.num_heads
    d, n = h // heads, len(tasks)
    roles = [PROMPTS[t.spec.method].table_role for t in tasks]
    lengths = [t.spec.virtual_tokens for t in tasks]
    s, q, width, past_from = table_shape(config, tasks)
    kinds = pooling_kinds(tasks)
    out = {"task.visible": np.zeros((n, layers, q + s), np.int32), "task.text_start": np.zeros(n, np.int32),
           "task.first": np.zeros(n, np.int32), "task.enters": np.zeros((n, layers), np.int32),
           "task.pooling": np.array([kinds.index(t.pooling) for t in tasks], np.int32),
           "task.normalize": np.array([t.normalize for t in tasks], np.int32),
           "task.classifier.weight": np.zeros((n, h, width), np.float32),
           "task.classifier.bias": np.zeros((n, width), np.float32)}
    if s:
        out["task.slot_embeds"] = np.zeros((n, s, h), np.float32)
    if "entered" in roles:
        out["task.late"] = np.zeros((n, s, h), np.float32)
    for i in range(past_from, layers):
        out[f"task.past.{i}"] = np.zeros((2, n, heads, q, d), np.float32)
    for kind in kinds:
        for name in POOLING[kind].table_params:
            out[f"task.{name}"] = None  # filled from the first task that has it
    for t, (task, role, p, own) in enumerate(zip(tasks, roles, lengths, values)):
        own = dict(own)
        prompt = own.pop("prompt_embeddings", None)
        if role is None:
            raise TaskTableError(task.name, f"prompt method {task.spec.method!r} has no place in a task table")
        if (prompt is None) != (p == 0 or role == ""):
            raise TaskTableError(task.name, f"prompt_embeddings do not match its {p} virtual tokens")
        if role in ("embedded", "entered"):
            if prompt.shape != (p, h):
                raise TaskTableError(task.name, f"prompt_embeddings {prompt.shape}, expected {(p, h)}")
            out["task.slot_embeds" if role == "embedded" else "task.late"][t, s - p :] = prompt
            seen_from = 0 if role == "embedded" else task.spec.layer
            out["task.visible"][t, seen_from:, q + s - p :] = 1
            out["task.first"][t] = s - p
            out["task.text_start"][t] = (p if role == "embedded" else 0) - s
            if role == "entered":
                out["task.enters"][t, task.spec.layer] = 1
        else:
            out["task.first"][t] = s
            out["task.text_start"][t] = (p if role == "past" else 0) - s
        if role == "past":
            first, rows = task.spec.layer, (layers - task.spec.layer) * 2 * h
            if prompt.shape != (p, rows):
                raise TaskTableError(task.name, f"prompt_embeddings {prompt.shape}, expected {(p, rows)}")
            for i in range(first, layers):
                out[f"task.past.{i}"][:, t, :, q - p :] = PrefixTuning.past(prompt, task.spec, config, i)
            out["task.visible"][t, first:, q - p : q] = 1
        wanted = {"classifier.weight", "classifier.bias", *POOLING[task.pooling].table_params}
        if set(own) != wanted:
            raise TaskTableError(task.name, f"head has {sorted(own)}, expected {sorted(wanted)}")
        weight, bias = np.asarray(own.pop("classifier.weight"), np.float32), own.pop("classifier.bias")
        if weight.shape != (task.num_labels, h):
            raise TaskTableError(task.name, f"classifier.weight {weight.shape}, expected {(task.num_labels, h)}")
        out["task.classifier.weight"][t, :, : task.num_labels] = weight.T
        out["task.classifier.bias"][t, : task.num_labels] = bias
        for name, value in own.items():  # the pooling's own: a [out, in] weight stored transposed
            value = np.asarray(value, np.float32)
            value = value.T if value.ndim == 2 else value
            if out[f"task.{name}"] is None:
                out[f"task.{name}"] = np.zeros((n,) + value.shape, np.float32)
            out[f"task.{name}"][t] = value
    return out


class TaskTableNet:
    """What both merged nets (MultiTaskClassifier, builder.models.decoder.DecoderMultiTask) hold: the tasks, each
    one's folded prompt and head as given (head_state), and the shape of their tables."""

    spec = None  # one prompt per task (specs), not one for the graph

    def hold_tasks(self, tasks: list, values: list, shape: TableShape) -> None:
        self.specs = tuple(tasks)
        self.values = [{k: np.asarray(v, np.float32).copy() for k, v in own.items()} for own in values]
        self.task_count = len(self.specs)
        self.shape = shape
        self.slots, self.past_len, self.past_from = shape.slots, shape.past, shape.past_from

    def head_state(self) -> dict:
        """Every task's prompt and head, keyed "<task>/<name>" (names as in a one-task bundle), as numpy."""
        return {f"{spec.name}/{k}": v.copy() for spec, own in zip(self.specs, self.values) for k, v in own.items()}


class MultiTaskClassifier(TaskTableNet, nn.Cell):
    """Several tasks' prompts and heads on one frozen encoder, each row of a batch its own task.

    inputs:  input_ids, attention_mask, token_type_ids  (int32, [batch, seq]), task_ids (int32, [batch])
    output:  logits [batch, widest task's labels]; a row's own labels first, zeros after

    Every prompt method with a `table_role` (builder.models.prompts) and every
    pooling merge: each row gathers its prompt (embedded vectors, a prefix's
    keys and values at each layer, or vectors entering at a layer), its
    pooling's parameters and its head from the task tables (task_tables) by
    its task id, so the work per row does not depend on how many tasks the
    graph holds.  Masked slots get exp(-1e9) = 0 attention weight, so each
    row sees exactly what its own bundle's graph sees; the merge checks each
    task's rows against its source bundle's graph (builder.pipelines.merge).
    """

    family = "encoder"  # builder.families
    shape_of = staticmethod(table_shape)

    def __init__(self, encoder: Encoder, tasks: list, values: list):
        super().__init__()
        cfg = encoder.config
        self.encoder = encoder
        self.hold_tasks(tasks, values, table_shape(cfg, tasks))
        tables = task_tables(cfg, self.specs, self.values)
        self.kinds = pooling_kinds(tasks)
        self.layer_count = cfg.num_layers
        self.enter_at = tuple(bool(e) for e in tables["task.enters"].any(0))  # layers where some prompt enters
        self.room = cfg.max_positions - cfg.position_offset
        self.position_offset = cfg.position_offset
        self.slot_index = Tensor(np.arange(self.slots + self.room, dtype=np.int32))
        self.tables = tables
        # Constants, not Parameters: nothing here trains, and MindIR then folds them like the encoder's weights.
        const = lambda name: Tensor(tables[name])  # noqa: E731
        self.visible, self.text_start, self.first = const("task.visible"), const("task.text_start"), const("task.first")
        self.enters, self.pooling_kind = const("task.enters"), const("task.pooling")
        self.normalize = const("task.normalize")
        self.classifier_weight, self.classifier_bias = const("task.classifier.weight"), const("task.classifier.bias")
        self.slot_embeds = const("task.slot_embeds") if self.slots else None
        self.late = const("task.late") if "task.late" in tables else None
        # A prefix's keys as model.Attention holds them: [T, heads, head_dim, Q]; values [T, heads, Q, head_dim].
        self.past_keys = tuple(Tensor(np.ascontiguousarray(tables[f"task.past.{i}"][0].transpose(0, 1, 3, 2)))
                               for i in range(self.past_from, cfg.num_layers))
        self.past_values = tuple(Tensor(tables[f"task.past.{i}"][1]) for i in range(self.past_from, cfg.num_layers))
        self.pooling_tables = tuple(tuple(const(f"task.{name}") for name in POOLING[kind].table_params)
                                    for kind in self.kinds)

    def construct(self, input_ids, attention_mask, token_type_ids, task_ids):
        b, s = input_ids.shape
        slots = self.slots
        emb = self.encoder.embeddings
        x = ops.gather(emb.word, input_ids, 0)
        types = token_type_ids
        if slots > 0:
            x = ops.concat((ops.gather(self.slot_embeds, task_ids, 0), x), 1)
            types = ops.concat((ops.zeros((b, slots), types.dtype), types), 1)
        # Slot m of a row is position m + text_start (text_start <= 0: slots before the task's prompt clamp to 0).
        positions = self.slot_index[: slots + s].expand_dims(0) + ops.gather(self.text_start, task_ids, 0).expand_dims(1)
        positions = ops.minimum(ops.maximum(positions, 0), self.room - 1) + self.position_offset
        x = emb.finish(x + ops.gather(emb.position, positions, 0), types)
        visible = ops.gather(self.visible, task_ids, 0)  # [b, layers, Q + S]
        enters = ops.gather(self.enters, task_ids, 0) > 0
        late = ops.gather(self.late, task_ids, 0) if self.late is not None else None
        q = self.past_len
        for i in range(self.layer_count):
            if self.enter_at[i]:  # an entered prompt replaces its rows' slot states here
                x = ops.concat((ops.select(enters[:, i].reshape(b, 1, 1).broadcast_to((b, slots, x.shape[2])),
                                           late, x[:, :slots]), x[:, slots:]), 1)
            if i >= self.past_from:
                bias = attention_bias(ops.concat((visible[:, i], attention_mask), 1))
                keys = ops.gather(self.past_keys[i - self.past_from], task_ids, 0)
                values = ops.gather(self.past_values[i - self.past_from], task_ids, 0)
                x = self.encoder.layers[i](x, bias, keys, values)
            else:
                bias = attention_bias(ops.concat((visible[:, i, q:], attention_mask), 1))
                x = self.encoder.layers[i](x, bias)
        first = (self.slot_index[: slots + 1].expand_dims(0)
                 == ops.gather(self.first, task_ids, 0).expand_dims(1)).astype(ms.float32)  # [b, S + 1]
        kind = ops.gather(self.pooling_kind, task_ids, 0).reshape(b, 1)
        pooled = None
        for k in range(len(self.kinds)):
            params = ()
            for table in self.pooling_tables[k]:
                params = params + (ops.gather(table, task_ids, 0),)
            rows = POOLING[self.kinds[k]].rows(x, attention_mask, first, params)
            pooled = rows if pooled is None else ops.select((kind == k).broadcast_to(rows.shape), rows, pooled)
        normalize = (ops.gather(self.normalize, task_ids, 0) > 0).reshape(b, 1).broadcast_to(pooled.shape)
        pooled = ops.select(normalize, unit_length(pooled), pooled)
        weight = ops.gather(self.classifier_weight, task_ids, 0)  # [b, hidden, width]
        return ops.matmul(pooled.expand_dims(1), weight).squeeze(1) + ops.gather(self.classifier_bias, task_ids, 0)


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
