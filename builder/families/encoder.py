"""The encoder family (BERT, RoBERTa): a pooled, linear-headed classifier over builder.models.encoder."""

from __future__ import annotations

from math import erf

import numpy as np

from .base import Family
from ..models.device import frozen
from ..graphs.runners import CellModel
from ..models.classifier import MultiTaskClassifier, PromptClassifier
from ..models.encoder import Encoder

# Chosen on MR dev only, by bench/experiments/zero_shot_search.py (docs/prompts.md, "The zero-shot search");
# other tasks default to the bare text and the label names.
MR_TEMPLATE = "{text} All in all, the movie was"
MR_LABEL_TEXTS = ("positive=The critic loved the film.", "positive=A positive review of a good movie.",
                  "negative=The critic hated the film.", "negative=A negative review of a bad movie.")


class EncoderFamily(Family):
    name = "encoder"

    def model(self, backbone) -> Encoder:
        return frozen(Encoder(backbone.config), backbone.parameters())

    def classifier(self, backbone, recipe, num_labels: int, prompt_init: dict | None, normalize: bool = False,
                   label_rows=None) -> PromptClassifier:
        net = PromptClassifier(self.model(backbone), recipe.virtual_tokens, num_labels, recipe.pooling, normalize,
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

    def token_activations(self, backbone, ids: list) -> tuple:
        """The tokens `ids` as one sequence through the frozen encoder (numpy, float32): the states entering
        each layer [n, hidden], and each layer's keys and values side by side [n, 2 * hidden] (a prefix's layout)."""
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

    def inference_model(self, net, batch_size: int = 64):
        return CellModel(net, batch_size)

    def multitask(self, backbone, tasks: list, values: list):
        return MultiTaskClassifier(self.model(backbone), tasks, values)

    def default_template(self, dataset) -> str:
        if dataset.name == "mr":
            return MR_TEMPLATE
        return "{text} {text_b}" if dataset.is_pair else "{text}"

    def default_label_texts(self, dataset) -> tuple:
        """Zero-shot label descriptions (builder.training.hard.Verbalizer)."""
        return MR_LABEL_TEXTS if dataset.name == "mr" else ()


ENCODER = EncoderFamily()
