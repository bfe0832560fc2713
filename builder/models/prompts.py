"""Prompt methods: what is learned in front of (or inside) the frozen encoder, a small registry.

Each entry is one Cell with both halves: the MindSpore side (trains and
exports to MindIR) and the ONNX side (static methods writing the same steps
into the ONNX graph), held to the same result by the export's parity check.
A new method is one class here and one line in `PROMPTS` (pt-build offers
every entry but "none"; `register` adds one from elsewhere, e.g. a test).  Its Parameters keep their own
names (no cell prefix): the names of the bundle's prompt.safetensors and of
PEFT's adapter files.

A method touches the encoder at three hooks, each a no-op unless it says:

    embed(embeds, mask, types)   at the word embeddings (before positions are added)
    enter(i, x, mask)            on the states entering layer i
    keys_values(table, i, b)     constant keys and values put in front of layer i's own

and declares `layout` (states in front of the text at the embeddings and at
the top, which pooling skips; where the text's positions start),
`first_layer` (the layers below it never see the prompt, so training computes
them once per text: builder.training.forward's layer cache), `initial` (its starting
values, from the tokens builder.training.init chooses) and `details` (what the
manifest records of it).

    none            the text as tokenized (hard prompts: the template is text)
    prompt-tuning   Lester et al. 2021 / PEFT prompt tuning: virtual tokens
                    before [CLS] / <s>; the mask gets ones, token types zeros,
                    and position embeddings count the virtual tokens too
    prefix-tuning   Li & Liang 2021, P-tuning v2 / PEFT prefix tuning: P learned
                    keys and values in front of every layer's own (from
                    `layer` on); the mask gets P ones in front of the keys and
                    the text's positions start at P, as transformers + PEFT
                    do it.  The table is PEFT's `prompt_embeddings`
                    [P, layers * 2 * hidden] (layer i: key block 2i, value
                    block 2i + 1, heads split inside a block; a decoder with
                    grouped-query attention: blocks as wide as its kv heads,
                    as PEFT's token_dim).  With
                    `projection`, PEFT's reparameterization (an embedding
                    through Linear-Tanh-Linear) trains the table and is
                    folded into it at export.
    late-prompt     Late Prompt Tuning (Liu et al. 2022): P learned vectors put
                    in front of the states entering layer `layer`; the layers
                    below run on the text alone, with its own positions
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import mindspore as ms  # noqa: F401  (before onnx: see builder.models.onnx_ops)
from mindspore import Parameter, nn, ops

from ptbundle.runtime.format import prefix_keys

from ..errors import RecipeError


@dataclass(frozen=True)
class PromptSpec:
    """Which prompt method, and its shape: what a graph needs to know to hold the prompt."""

    method: str = "none"
    virtual_tokens: int = 0
    layer: int = 0  # prefix-tuning: first layer with a prefix; late-prompt: the layer it enters
    projection: int = 0  # prefix-tuning: hidden size of the reparameterization MLP (0: none; folded at export)

    @classmethod
    def of(cls, method: str | None, virtual_tokens: int, layer: int = 0, projection: int = 0) -> "PromptSpec":
        if method is None:
            method = "prompt-tuning" if virtual_tokens > 0 else "none"
        if method == "none" or virtual_tokens == 0:
            return cls()
        kind = PROMPTS[method]
        return cls(method, virtual_tokens, layer if kind.takes_layer else 0, projection if kind.takes_projection else 0)

    def folded(self) -> "PromptSpec":
        """The spec of the inference graph: the reparameterization folded away."""
        return PromptSpec(self.method, self.virtual_tokens, self.layer, 0)

    def positions(self) -> int:
        """Position rows the prompt takes before the text's (prompt tuning's tokens; a prefix's shift)."""
        embedded, shift, _ = PROMPTS[self.method].layout(self)
        return embedded + shift

    def details(self) -> dict:
        """What a task's manifest records of its prompt beyond method and length."""
        return PROMPTS[self.method].details(self)

    @classmethod
    def recorded(cls, method: str, virtual_tokens: int, details: dict) -> "PromptSpec":
        """The (folded) spec a task's manifest records: method, length and the layer its details name."""
        if method not in PROMPTS:
            raise RecipeError(f"prompt method {method!r} is not one of {', '.join(PROMPTS)}")
        return cls.of(method, virtual_tokens, PROMPTS[method].recorded_layer(details))


class PromptMethod(nn.Cell):
    """The hooks' defaults: the text goes through untouched."""

    virtual_tokens = 0  # states in front of the text at the top (pooling skips them)
    position_shift = 0  # positions the text's first token is moved by
    first_layer = 0  # layers below this one never see the prompt
    has_keys_values = False
    # Capabilities, read where a kind is chosen (never a list of names kept elsewhere):
    decoders = True  # a causal decoder takes it (builder.models.decoder.DecoderClassifier)
    # Where builder.models.classifier.MultiTaskClassifier's task table holds it (pt-build merge): "embedded"
    # (vectors at the embeddings), "past" (keys and values in front of layers), "entered" (vectors joining the
    # states at a layer), "" (nothing: no prompt); None: a merge cannot hold it.
    table_role = None
    peft_type = None  # the PEFT method that holds it exactly (a bundle's peft/ adapter, builder.bundles.peft)
    takes_layer = False  # --layer means something to it
    takes_projection = False  # --prefix-projection means something to it

    @staticmethod
    def peft_refusal(spec: PromptSpec) -> str | None:
        """Why PEFT cannot hold this prompt, or None if it can."""
        return f"prompt method {spec.method!r}"

    @staticmethod
    def recorded_layer(details: dict) -> int:
        """The layer a task's manifest details record (details() writes it)."""
        return 0

    def __init__(self, config, spec: PromptSpec):
        super().__init__(auto_prefix=False)
        self.spec = spec
        _, self.position_shift, self.virtual_tokens = self.layout(spec)

    @staticmethod
    def layout(spec: PromptSpec) -> tuple:
        """(states put in front at the embeddings, position shift of the text, states in front of it at the top)."""
        return 0, 0, 0

    def construct(self, embeds, attention_mask, token_type_ids):
        return self.embed(embeds, attention_mask, token_type_ids)

    def embed(self, embeds, attention_mask, token_type_ids):
        return embeds, attention_mask, token_type_ids

    def enter(self, i: int, x, mask):
        return x, mask

    def table(self):
        """What keys_values slices (prefix-tuning), computed once per forward pass."""
        return None

    def keys_values(self, table, i: int, batch: int):
        return None, None

    def params(self) -> dict:
        return {}

    def folded(self) -> dict:
        """params() as the inference graph holds them (the reparameterization applied), numpy."""
        return {k: v.asnumpy().copy() for k, v in self.params().items()}

    @staticmethod
    def initial(spec: PromptSpec, start) -> dict:
        """Starting values of params(), by name.  `start` (builder.training.init.TokenStart or RandomStart) gives the
        starting tokens' `embeddings()` [P, hidden], their `states(layer)` entering a layer [P, hidden], and
        their `keys_values(first)` in every layer from `first` on [P, layers x 2 x hidden] (a prefix's layout)."""
        return {}

    @staticmethod
    def details(spec: PromptSpec) -> dict:
        return {}

    # ONNX halves: the same hooks writing ops into an onnx_export.Graph; `w` holds folded() arrays.
    @staticmethod
    def onnx_embed(g, w: dict, spec: PromptSpec, embeds: str, mask: str, types, batch: str):
        return embeds, mask, types

    @staticmethod
    def onnx_enter(g, w: dict, spec: PromptSpec, i: int, x: str, mask: str, batch: str):
        return x, mask

    @staticmethod
    def onnx_past(g, w: dict, spec: PromptSpec, config, i: int, batch: str):
        """Layer i's constant [2, batch, heads, P, head_dim] keys and values (onnxruntime Attention's `past`), or None."""
        return None


class NoPrompt(PromptMethod):
    table_role = ""

    @staticmethod
    def peft_refusal(spec: PromptSpec) -> str | None:
        return "no prompt (0 virtual tokens: a head on the encoder alone)"


def prefix_rows(g, batch: str, p: int, value: int, name: str) -> str:
    """[batch, p] int32 filled with `value` (the mask's ones, the token types' zeros)."""
    shape = g.op("Concat", [batch, g.const("prompt_len", [p], np.int64)], axis=0)
    return g.op("Expand", [g.const(name, [[value]], np.int32), shape])


def prepend(vectors, x, mask):
    """`vectors` [P, hidden] in front of every row of x [b, s, hidden]; the mask gets P ones in front."""
    b, p = x.shape[0], vectors.shape[0]
    prompt = ops.broadcast_to(vectors.expand_dims(0), (b, p, vectors.shape[1]))
    return ops.concat((prompt, x), 1), ops.concat((ops.ones((b, p), mask.dtype), mask), 1)


def onnx_prepend(g, vectors: np.ndarray, x: str, mask: str, batch: str) -> tuple:
    """prepend's ONNX half: the constant `vectors` (PEFT's prompt_embeddings) in front of every row of x."""
    p, hidden = vectors.shape
    prompt_shape = g.op("Concat", [batch, g.const("prompt_len_hidden", [p, hidden], np.int64)], axis=0)
    prompt = g.op("Expand", [g.const("prompt_embeddings", vectors[None]), prompt_shape])
    return (g.op("Concat", [prompt, x], axis=1),
            g.op("Concat", [prefix_rows(g, batch, p, 1, "prefix_ones"), mask], axis=1))


class PromptTuning(PromptMethod):
    table_role = "embedded"
    peft_type = "PROMPT_TUNING"

    @staticmethod
    def peft_refusal(spec: PromptSpec) -> str | None:
        return None

    def __init__(self, config, spec: PromptSpec):
        super().__init__(config, spec)
        self.embeddings = Parameter(np.zeros((spec.virtual_tokens, config.hidden_size), np.float32),
                                    name="prompt_embeddings")

    @staticmethod
    def layout(spec: PromptSpec) -> tuple:
        return spec.virtual_tokens, 0, spec.virtual_tokens

    def embed(self, embeds, attention_mask, token_type_ids):
        b, p = embeds.shape[0], self.virtual_tokens
        embeds, mask = prepend(self.embeddings, embeds, attention_mask)
        return embeds, mask, ops.concat((ops.zeros((b, p), token_type_ids.dtype), token_type_ids), 1)

    def params(self) -> dict:
        return {"prompt_embeddings": self.embeddings}

    @staticmethod
    def initial(spec: PromptSpec, start) -> dict:
        return {"prompt_embeddings": start.embeddings()}

    @staticmethod
    def onnx_embed(g, w: dict, spec: PromptSpec, embeds: str, mask: str, types, batch: str):
        embeds, mask = onnx_prepend(g, w["prompt_embeddings"], embeds, mask, batch)
        if types is not None:  # an architecture without token types has none to extend
            types = g.op("Concat", [prefix_rows(g, batch, spec.virtual_tokens, 0, "prefix_zeros"), types], axis=1)
        return embeds, mask, types


class PrefixTuning(PromptMethod):
    has_keys_values = True
    table_role = "past"
    peft_type = "PREFIX_TUNING"
    takes_layer = takes_projection = True

    @staticmethod
    def peft_refusal(spec: PromptSpec) -> str | None:
        if spec.layer > 0:
            return f"prefix from layer {spec.layer} (PEFT's prefix tuning has a prefix at every layer)"
        return None

    def __init__(self, config, spec: PromptSpec):
        super().__init__(config, spec)
        # One key (or value) block per layer is as wide as the layer's keys: the hidden size, or a decoder's
        # kv_heads x head_dim under grouped-query attention (PEFT's token_dim then, its "heads" the kv heads).
        h, p = getattr(config, "kv_width", config.hidden_size), spec.virtual_tokens
        if not 0 <= spec.layer < config.num_layers:
            raise RecipeError(f"--layer {spec.layer}: the model has layers 0-{config.num_layers - 1}")
        self.first_layer = spec.layer
        self.p, self.hidden, self.heads = p, h, getattr(config, "num_kv_heads", config.num_heads)
        self.head_dim = h // self.heads
        width = (config.num_layers - spec.layer) * 2 * h
        self.projection = spec.projection
        if spec.projection:  # PEFT prefix_projection: embedding -> Linear -> Tanh -> Linear
            self.embeddings = Parameter(np.zeros((p, h), np.float32), name="prefix.embedding")
            self.up = nn.Dense(h, spec.projection, activation="tanh")
            self.down = nn.Dense(spec.projection, width)
        else:
            self.embeddings = Parameter(np.zeros((p, width), np.float32), name="prompt_embeddings")

    @staticmethod
    def layout(spec: PromptSpec) -> tuple:
        return 0, spec.virtual_tokens, 0  # transformers offsets positions by the cache's length (PEFT's prefix)

    def table(self):
        if self.projection:
            return self.down(self.up(self.embeddings))
        return self.embeddings

    def keys_values(self, table, i: int, batch: int):
        j, h, p = i - self.first_layer, self.hidden, self.p
        key = table[:, 2 * j * h : (2 * j + 1) * h].reshape(p, self.heads, self.head_dim).transpose(1, 2, 0)
        value = table[:, (2 * j + 1) * h : (2 * j + 2) * h].reshape(p, self.heads, self.head_dim).transpose(1, 0, 2)
        # as model.Attention holds them: keys [b, heads, head_dim, P], values [b, heads, P, head_dim]
        return (ops.broadcast_to(key.expand_dims(0), (batch,) + key.shape),
                ops.broadcast_to(value.expand_dims(0), (batch,) + value.shape))

    def params(self) -> dict:
        if self.projection:
            return {"prefix.embedding": self.embeddings, "prefix.up.weight": self.up.weight,
                    "prefix.up.bias": self.up.bias, "prefix.down.weight": self.down.weight,
                    "prefix.down.bias": self.down.bias}
        return {"prompt_embeddings": self.embeddings}

    def folded(self) -> dict:
        return {"prompt_embeddings": self.table().asnumpy().copy()}

    @staticmethod
    def initial(spec: PromptSpec, start) -> dict:
        if spec.projection:  # the reparameterization's input lives in embedding space
            return {"prefix.embedding": start.embeddings()}
        return {"prompt_embeddings": start.keys_values(spec.layer)}

    @staticmethod
    def recorded_layer(details: dict) -> int:
        return int(details.get("first_layer", 0))

    @staticmethod
    def details(spec: PromptSpec) -> dict:
        return {"first_layer": spec.layer, "layout": "prompt_embeddings [P, layers * 2 * hidden]: layer i's keys"
                " in block 2i, values in 2i + 1 (PEFT's); text positions start at P"}

    @staticmethod
    def past(table: np.ndarray, spec: PromptSpec, config, i: int) -> np.ndarray:
        """Layer i's keys and values of a folded table [P, layers x 2 x hidden], as onnxruntime's Attention takes
        its `past`: [2, heads, P, head_dim] (an encoder's; i from spec.layer on)."""
        return prefix_keys(table, i - spec.layer, config.num_heads, config.hidden_size)

    @staticmethod
    def onnx_past(g, w: dict, spec: PromptSpec, config, i: int, batch: str):
        if i < spec.layer:
            return None
        h, p, heads = config.hidden_size, spec.virtual_tokens, config.num_heads
        past = np.ascontiguousarray(PrefixTuning.past(w["prompt_embeddings"], spec, config, i)[:, None])
        shape = g.op("Concat", [g.const("two", [2], np.int64), batch,
                                g.const("past_dims", [heads, p, h // heads], np.int64)], axis=0)
        return g.op("Expand", [g.const(f"prefix.{i}", past), shape])


class LatePrompt(PromptMethod):
    decoders = False  # it would need positions of its own in a causal decoder
    table_role = "entered"
    takes_layer = True

    @staticmethod
    def peft_refusal(spec: PromptSpec) -> str | None:
        return (f"late prompt (enters at layer {spec.layer}; PEFT's prompts enter at the embeddings, or as a"
                f" prefix of every layer)")

    def __init__(self, config, spec: PromptSpec):
        super().__init__(config, spec)
        if not 0 < spec.layer < config.num_layers:
            raise RecipeError(f"--layer {spec.layer}: a late prompt enters at layer 1-{config.num_layers - 1}"
                              f" (at layer 0 it is prompt-tuning)")
        self.first_layer = spec.layer
        self.embeddings = Parameter(np.zeros((spec.virtual_tokens, config.hidden_size), np.float32),
                                    name="prompt_embeddings")

    @staticmethod
    def layout(spec: PromptSpec) -> tuple:
        return 0, 0, spec.virtual_tokens

    def enter(self, i: int, x, mask):
        return prepend(self.embeddings, x, mask) if i == self.first_layer else (x, mask)

    def params(self) -> dict:
        return {"prompt_embeddings": self.embeddings}

    @staticmethod
    def initial(spec: PromptSpec, start) -> dict:
        return {"prompt_embeddings": start.states(spec.layer)}

    @staticmethod
    def recorded_layer(details: dict) -> int:
        return int(details.get("layer", 0))

    @staticmethod
    def details(spec: PromptSpec) -> dict:
        return {"layer": spec.layer}

    @staticmethod
    def onnx_enter(g, w: dict, spec: PromptSpec, i: int, x: str, mask: str, batch: str):
        return onnx_prepend(g, w["prompt_embeddings"], x, mask, batch) if i == spec.layer else (x, mask)


PROMPTS: dict[str, type] = {}


def register(name: str, method: type) -> type:
    """Make `method` (a PromptMethod subclass) a choice of --method (a later registration of a name replaces it)."""
    PROMPTS[name] = method
    return method


register("none", NoPrompt)
register("prompt-tuning", PromptTuning)
register("prefix-tuning", PrefixTuning)
register("late-prompt", LatePrompt)

