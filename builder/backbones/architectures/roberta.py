"""RoBERTa: BERT's tensors under "roberta.", positions numbered from pad_token_id + 1, <s> ... </s>."""

from .base import HF_DEFAULTS, Architecture
from .bert import POOLER, WEIGHTS


def after_pad(cfg) -> int:
    # A fairseq legacy: position ids start after the pad id.  With right
    # padding and no pads inside the text this is a plain offset.
    return cfg.pad_token_id + 1


ROBERTA = Architecture(
    model_type="roberta",
    prefix="roberta.",
    weights=WEIGHTS,
    defaults={**HF_DEFAULTS, "pad_token_id": 1},
    position_offset=after_pad,
    special_tokens={"cls": "<s>", "sep": "</s>", "pad": "<pad>"},
    pooler=POOLER,  # RobertaModel's, when the checkpoint has one
)
