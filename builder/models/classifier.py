"""Classifiers over the frozen encoder: `PromptClassifier` (one prompt method + pooling + linear head) and
`MultiTaskClassifier` (a prompt and head per task, chosen per row), with `HeadState`, the trained part as
named arrays, which the decoder's classifier shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ptbundle.runtime.format import TABLE_PREFIX, lay_out_row, table_names, write_task

from ..errors import RecipeError
from .encoder import Encoder, TrainDropout, attention_bias
from .pooling import POOLING
from .prompts import PROMPTS, PromptSpec


class HeadState:
    """The trained part of a classifier as named arrays: `head_params()` (prompt and head, under stable names)
    read and written as numpy, the prompt folded for inference.  PromptClassifier and the decoder's
    DecoderClassifier (builder.models.decoder) share it; each says what its head_params and prompt are."""

    task_count = 1  # tasks the graph serves (a MultiTaskClassifier's task_ids pick among several)
    tables = None  # a merged net's task tables (TaskTableNet): its graphs' inputs, not in them

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
    folded prompt and head as a one-task bundle's prompt.safetensors holds them, or its rows of a merged bundle's
    tables, runtime.format.task_rows, which may be sized for other tasks).  Names are the graphs' own.

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
        if role is None:
            raise TaskTableError(task.name, f"prompt method {task.spec.method!r} has no place in a task table")
        if is_rows(own):
            lay_out_row(out, t, role, p, task.spec.layer, q, s)  # what it sees and where its text starts
            place_rows(out, t, task, role, own, q, s)
            continue
        prompt = own.get("prompt_embeddings")
        if (prompt is None) != (p == 0 or role == ""):
            raise TaskTableError(task.name, f"prompt_embeddings do not match its {p} virtual tokens")
        want = {"embedded": (p, h), "entered": (p, h), "past": (p, (layers - task.spec.layer) * 2 * h)}.get(role)
        if want is not None and prompt.shape != want:
            raise TaskTableError(task.name, f"prompt_embeddings {prompt.shape}, expected {want}")
        head = {k: v for k, v in own.items() if k != "prompt_embeddings"}
        wanted = {"classifier.weight", "classifier.bias", *POOLING[task.pooling].table_params}
        if set(head) != wanted:
            raise TaskTableError(task.name, f"head has {sorted(head)}, expected {sorted(wanted)}")
        if np.shape(head["classifier.weight"]) != (task.num_labels, h):
            raise TaskTableError(task.name, f"classifier.weight {np.shape(head['classifier.weight'])}, expected"
                                            f" {(task.num_labels, h)}")
        for name in POOLING[task.pooling].table_params:  # sized by the first task that has it
            if out[f"task.{name}"] is None:
                out[f"task.{name}"] = np.zeros((n,) + np.shape(head[name])[::-1], np.float32)
        write_task(out, t, role, p, task.spec.layer, own)
    return out


def is_rows(own: dict) -> bool:
    """A task given as its rows of a merged bundle's tables (runtime.format.task_rows), not as its own arrays."""
    return any(k.startswith(TABLE_PREFIX) for k in own)


def place_rows(out: dict, t: int, task: TaskHead, role: str, rows: dict, q: int, s: int) -> None:
    """Row t of the learned tables from a task's rows of another merged bundle's: the same vectors, right-aligned
    against the text again (the other tables may hold more slots or longer prefixes) and the head's labels first,
    so its outputs are the same; what task_tables derives from the task itself (visibility, positions) it keeps."""
    p = task.spec.virtual_tokens
    if role in ("embedded", "entered") and p:
        name = "task.slot_embeds" if role == "embedded" else "task.late"
        out[name][t, s - p :] = rows[name][rows[name].shape[0] - p :]
    if role == "past":
        for i in range(task.spec.layer, len(out["task.enters"][t])):
            past = rows[f"task.past.{i}"]  # [2, heads, Q', head_dim]
            out[f"task.past.{i}"][:, t, :, q - p :] = past[:, :, past.shape[2] - p :]
    out["task.classifier.weight"][t, :, : task.num_labels] = rows["task.classifier.weight"][:, : task.num_labels]
    out["task.classifier.bias"][t, : task.num_labels] = rows["task.classifier.bias"][: task.num_labels]
    for name in POOLING[task.pooling].table_params:
        if out[f"task.{name}"] is None:
            out[f"task.{name}"] = np.zeros((len(out["task.pooling"]),) + rows[f"task.{name}"].shape, np.float32)
        out[f"task.{name}"][t] = rows[f"task.{name}"]


class TaskTableNet:
    """What both merged nets (MultiTaskClassifier, builder.models.decoder.DecoderMultiTask) share: the tasks, the
    shape of their tables, and the tables themselves, which their graphs take as inputs (runtime.format).

    A net's `forward(..., tables)` reads the tables it is given, in table_names' order: `construct` gives it
    the ones it holds, the graph it exports (TableInputs) the ones the runtime feeds."""

    spec = None  # one prompt per task (specs), not one for the graph

    def hold_tasks(self, tasks: list, tables: dict, shape: TableShape) -> None:
        self.specs = tuple(tasks)
        self.task_count = len(self.specs)
        self.shape = shape
        self.slots, self.past_len, self.past_from = shape.slots, shape.past, shape.past_from
        self.tables = tables
        self.table_order = tuple(table_names(tables))
        self.at = {name: k for k, name in enumerate(self.table_order)}
        # Sharing the arrays' memory: at 1,000 tasks the tables are hundreds of MB (prefix keys and values)
        self.held = tuple(Tensor.from_numpy(np.ascontiguousarray(tables[name])) for name in self.table_order)

    def table(self, tables: tuple, name: str):
        return tables[self.at[name]]

    def rows(self, tables: tuple, name: str, task_ids):
        """Each row's entry of the table `name` (its task's)."""
        return ops.gather(tables[self.at[name]], task_ids, 0)

    def head_state(self) -> dict:
        """The task tables: what a merged bundle's prompt.safetensors holds (runtime.format)."""
        return dict(self.tables)  # read only by the writer: no copy of what may be hundreds of MB

    def construct(self, input_ids, attention_mask, token_type_ids, task_ids):
        return self.forward(input_ids, attention_mask, token_type_ids, task_ids, self.held)


class TableInputs(nn.Cell):
    """A merged net whose task tables are inputs after task_ids (runtime.format): what its MindIR holds."""

    def __init__(self, net: TaskTableNet):
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, input_ids, attention_mask, token_type_ids, task_ids, *tables):
        return self.net.forward(input_ids, attention_mask, token_type_ids, task_ids, tables)


class MultiTaskClassifier(TaskTableNet, nn.Cell):
    """Several tasks' prompts and heads on one frozen encoder, each row of a batch its own task.

    inputs:  input_ids, attention_mask, token_type_ids  (int32, [batch, seq]), task_ids (int32, [batch]),
             and in its graphs the task tables (runtime.format)
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
        self.hold_tasks(tasks, task_tables(cfg, tasks, values), table_shape(cfg, tasks))
        self.kinds = pooling_kinds(tasks)
        self.layer_count = cfg.num_layers
        # Layers where some prompt enters: the graph's structure, fixed by the tasks it is built for.
        self.enter_at = tuple(bool(e) for e in self.tables["task.enters"].any(0))
        self.has_late = "task.late" in self.tables
        self.room = cfg.max_positions - cfg.position_offset
        self.position_offset = cfg.position_offset
        self.slot_index = Tensor(np.arange(self.slots + self.room, dtype=np.int32))
        self.pooling_params = tuple(tuple(f"task.{name}" for name in POOLING[kind].table_params) for kind in self.kinds)

    def forward(self, input_ids, attention_mask, token_type_ids, task_ids, tables):
        b, s = input_ids.shape
        slots = self.slots
        emb = self.encoder.embeddings
        x = ops.gather(emb.word, input_ids, 0)
        types = token_type_ids
        if slots > 0:
            x = ops.concat((self.rows(tables, "task.slot_embeds", task_ids), x), 1)
            types = ops.concat((ops.zeros((b, slots), types.dtype), types), 1)
        # Slot m of a row is position m + text_start (text_start <= 0: slots before the task's prompt clamp to 0).
        positions = (self.slot_index[: slots + s].expand_dims(0)
                     + self.rows(tables, "task.text_start", task_ids).expand_dims(1))
        positions = ops.minimum(ops.maximum(positions, 0), self.room - 1) + self.position_offset
        x = emb.finish(x + ops.gather(emb.position, positions, 0), types)
        visible = self.rows(tables, "task.visible", task_ids)  # [b, layers, Q + S]
        enters = self.rows(tables, "task.enters", task_ids) > 0
        late = self.rows(tables, "task.late", task_ids) if self.has_late else None
        q = self.past_len
        for i in range(self.layer_count):
            if self.enter_at[i]:  # an entered prompt replaces its rows' slot states here
                x = ops.concat((ops.select(enters[:, i].reshape(b, 1, 1).broadcast_to((b, slots, x.shape[2])),
                                           late, x[:, :slots]), x[:, slots:]), 1)
            if i >= self.past_from:
                bias = attention_bias(ops.concat((visible[:, i], attention_mask), 1))
                past = ops.gather(self.table(tables, f"task.past.{i}"), task_ids, 1)  # [2, b, heads, Q, head_dim]
                # keys as model.Attention holds them: [b, heads, head_dim, Q]
                x = self.encoder.layers[i](x, bias, past[0].transpose(0, 1, 3, 2), past[1])
            else:
                bias = attention_bias(ops.concat((visible[:, i, q:], attention_mask), 1))
                x = self.encoder.layers[i](x, bias)
        first = (self.slot_index[: slots + 1].expand_dims(0)
                 == self.rows(tables, "task.first", task_ids).expand_dims(1)).astype(ms.float32)  # [b, S + 1]
        kind = self.rows(tables, "task.pooling", task_ids).reshape(b, 1)
        pooled = None
        for k in range(len(self.kinds)):
            params = ()
            for name in self.pooling_params[k]:
                params = params + (self.rows(tables, name, task_ids),)
            rows = POOLING[self.kinds[k]].rows(x, attention_mask, first, params)
            pooled = rows if pooled is None else ops.select((kind == k).broadcast_to(rows.shape), rows, pooled)
        normalize = (self.rows(tables, "task.normalize", task_ids) > 0).reshape(b, 1).broadcast_to(pooled.shape)
        pooled = ops.select(normalize, unit_length(pooled), pooled)
        weight = self.rows(tables, "task.classifier.weight", task_ids)  # [b, hidden, width]
        return (ops.matmul(pooled.expand_dims(1), weight).squeeze(1)
                + self.rows(tables, "task.classifier.bias", task_ids))


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
