"""What a backbone family is: the one seam between encoders and decoders.

Everything that differs between a BERT-like encoder and a Llama-like causal
decoder lives in one `Family` object (builder.families.encoder.ENCODER,
builder.families.decoder.DECODER).  The rest of the builder asks
`family_of(backbone)` or `family_of(net)` and calls it; it never tests which
family it has.  Capabilities are attributes, behaviour is methods.
"""

from __future__ import annotations


class Family:
    """One backbone family (`Architecture.family` names it; a net carries it as its class's `family`)."""

    name: str
    generates: bool = False  # builds generation bundles (pt-build instruct)
    dropout: bool = True  # --dropout applies (builder.models.encoder.TrainDropout)
    soft_reads_template: bool = False  # a soft bundle reads its input through a template (the answer slot)
    hard_apart: bool = False  # hard bundles build in a process of their own (memory: README, "Decoders")
    soft_head: str = "linear"  # a soft bundle's manifest head
    zero_shot: str = "embedding"  # builder.training.hard.ZERO_SHOT's key for this family's zero-shot head

    def model(self, backbone):
        """The backbone as a frozen MindSpore Cell."""
        raise NotImplementedError

    def classifier(self, backbone, recipe, num_labels: int, prompt_init: dict | None, normalize: bool = False,
                   label_rows=None):
        """The net to train: frozen backbone, initial prompt (none with 0 virtual tokens), fresh head."""
        raise NotImplementedError

    def token_activations(self, backbone, ids: list) -> tuple:
        """The tokens `ids` as one sequence: (states entering each layer [n, hidden], each layer's keys and
        values side by side [n, 2 * kv_width]: a prefix's layout), numpy."""
        raise NotImplementedError

    def label_rows(self, backbone, tokenizer, label_words: dict | None, labels):
        """A classifier head's starting rows from label words, or None (a fresh head)."""
        return None

    def inference_model(self, net, batch_size: int = 64):
        """The model that scores `net` outside training, called as the runtime calls a backend."""
        raise NotImplementedError

    def multitask(self, backbone, tasks: list, values: list):
        """The merged net of `tasks` (builder.models.classifier.TaskHead) with their folded prompt and head
        `values`, each row gathering its own from task tables (pt-build merge); ValueError naming a task whose
        values do not fit."""
        raise NotImplementedError

    def lower_model(self, net):
        """What runs `net.lower` for the layer cache (builder.training.forward.LayerCache); None: the Cell."""
        return None

    def pooling(self, recipe) -> str:
        """The manifest's pooling of a bundle built with `recipe`."""
        return recipe.pooling

    def check_recipe(self, recipe, backbone) -> None:
        """Refuse what this family cannot train, before any work (a RecipeError naming the option)."""

    def default_template(self, dataset) -> str:
        raise NotImplementedError

    def default_label_texts(self, dataset) -> tuple:
        raise NotImplementedError
