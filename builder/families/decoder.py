"""The decoder family (Llama, Qwen2): classification through the LM head at the text's last token, and generation."""

from __future__ import annotations

import numpy as np
from mindspore import Tensor

from ..errors import RecipeError
from .base import Family
from ..models.device import frozen
from ..graphs.runners import ScratchOnnx
from ..models.decoder import Decoder, DecoderClassifier, DecoderMultiTask, sequence_cache

# A causal LM reads the task as an instruction in its chat format (ChatML: SmolLM2-Instruct's) and is read
# at the answer slot, the template's end; its labels are single words.  Chosen on MR dev by
# bench/experiments/decoder_zero_shot.py (docs/decoders.md).
# ChatML, the chat format of the instruct checkpoints this family serves (SmolLM2, Qwen2.5): a user turn and the
# start of the assistant's, with "{}" for the turn's text; the assistant's turn ends at CHATML_END.
CHATML_USER = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
CHATML_END = "<|im_end|>"
MR_TEMPLATE = CHATML_USER.format("What is the sentiment of this movie review?\n{text}") + "The sentiment of this review is"
TEMPLATE = CHATML_USER.format("{text}") + "The answer is"
PAIR_TEMPLATE = CHATML_USER.format("{text}\n{text_b}") + "The answer is"
MR_LABEL_WORDS = ("positive=positive", "negative=negative")


class DecoderFamily(Family):
    name = "decoder"
    generates = True
    dropout = False  # trained without dropout, as Llama checkpoints are
    soft_reads_template = True
    # MindSpore's CPU allocator keeps what each compiled graph took until the process exits: with SmolLM2 the
    # zero-shot bundle's export left 7.6 GB behind, and the soft prompt's training then went past 24 GB.
    hard_apart = True
    soft_head = "label-words"
    zero_shot = "lm"

    def model(self, backbone) -> Decoder:
        return frozen(Decoder(backbone.config), backbone.parameters())

    def classifier(self, backbone, recipe, num_labels: int, prompt_init: dict | None, normalize: bool = False,
                   label_rows=None) -> DecoderClassifier:
        """The head starts as `label_rows` (the label words' rows of the LM head) with no bias, or at random
        without them (a probe)."""
        net = DecoderClassifier(self.model(backbone), num_labels, recipe.prompt_spec())
        rng = np.random.RandomState(recipe.seed)
        weight = label_rows if label_rows is not None else rng.normal(0, 0.02, (num_labels, backbone.config.hidden_size))
        net.load_head_state({"classifier.weight": weight, "classifier.bias": np.zeros(num_labels),
                             **(prompt_init if recipe.virtual_tokens > 0 else {})})
        return net

    def token_activations(self, backbone, ids: list) -> tuple:
        """A prefix started from them is exactly the KV cache of those tokens read at positions 0..n-1."""
        states, cache = sequence_cache(self.model(backbone), Tensor(backbone.word_embeddings[ids]))
        flat = lambda a: a.transpose(1, 0, 2).reshape(a.shape[1], -1)  # noqa: E731  [kv, n, d] -> [n, kv * d]
        return states, [np.concatenate([flat(cache[f"key.{i}"]), flat(cache[f"value.{i}"])], 1)
                        for i in range(len(states))]

    def label_rows(self, backbone, tokenizer, label_words: dict | None, labels):
        return None if not label_words else label_rows(backbone, tokenizer, label_words, labels)

    def inference_model(self, net, batch_size: int = 64):
        # onnxruntime, not the Cell: MindSpore keeps GBs of buffers per compiled shape (graphs.runners.ScratchOnnx)
        return ScratchOnnx(net)

    def lower_model(self, net):
        return ScratchOnnx(net, lower=True)

    def multitask(self, backbone, tasks: list, values: list):
        return DecoderMultiTask(self.model(backbone), tasks, values)

    def pooling(self, recipe) -> str:
        return "last"

    def check_recipe(self, recipe, backbone) -> None:
        if recipe.dropout:  # builder.models.encoder.TrainDropout sits in the encoder only
            raise RecipeError(f"--dropout {recipe.dropout}: {backbone.name} is a decoder, trained here without"
                              f" dropout (as Llama checkpoints are)")

    def default_template(self, dataset) -> str:
        return MR_TEMPLATE if dataset.name == "mr" else PAIR_TEMPLATE if dataset.is_pair else TEMPLATE

    def default_label_texts(self, dataset) -> tuple:
        """Label words (the label's own name where there are none)."""
        return MR_LABEL_WORDS if dataset.name == "mr" else ()


def label_rows(backbone, tokenizer, label_words: dict, labels) -> np.ndarray:
    """[labels, hidden]: each label's row of the LM head, the mean of its words' rows when it has several.

    A word is read as it follows the template's last word: with a space in
    front (" positive"), and by its first token (the one the model would say
    next; later tokens would need the first one fed back)."""
    table = backbone.output_table()
    rows = []
    for label in labels:
        ids = []
        for word in label_words.get(label) or [label]:
            if not word.strip():
                raise RecipeError(f"label word {word!r} of {label!r} is empty")
            ids.append(tokenizer.encode(" " + word.strip(), add_special_tokens=False).ids[0])
        rows.append(table[ids].mean(0))
    return np.stack(rows).astype(np.float32)


DECODER = DecoderFamily()
