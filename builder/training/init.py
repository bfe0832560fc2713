"""A prompt's starting values: frequent training tokens, a text, or random (Lester et al. 2021, section 2.2)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from ptbundle.runtime.text import encode

from ..backbones.backbone import Backbone
from ..errors import RecipeError
from ..families import family_of
from ..models.prompts import PROMPTS
from ..recipe import Recipe


def initial_prompt(backbone: Backbone, recipe: Recipe, tokenizer, texts) -> dict:
    """Starting values of the prompt's Parameters, by name (each method says which: builder.models.prompts `initial`).

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
            self._activations = family_of(self.backbone).token_activations(self.backbone, self.ids)
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
        cfg = self.backbone.config  # a decoder's keys are as wide as its kv heads (kv_width)
        return self.rng.normal(0, 1.0, (self.n, (cfg.num_layers - first) * 2 * cfg.kv_width))
