"""The builder's building blocks that benchmarks and experiments compose (bench/), named once, here.

`ptbundle.builder` (builder.api) builds bundles; this module is for measuring how: the training step, the
quantizers, the graph writers and the zero-shot heads, each re-exported from the layer that holds it.  A
script that uses these names keeps working when a module moves; only this file changes.
"""

from .backbones.backbone import load_backbone, packaged_gguf  # noqa: F401
from .backbones.configs import DecoderConfig  # noqa: F401
from .backbones.gguf import hf_directory  # noqa: F401
from .bundles.generation import quantize_decoder, write_generation_bundle  # noqa: F401
from .bundles.manifest import backbone_info  # noqa: F401
from .families.decoder import MR_TEMPLATE as MR_DECODER_TEMPLATE, label_rows  # noqa: F401
from .graphs.onnx_decoder import Kernels, decoder_graph  # noqa: F401
from .graphs.onnx_encoder import HEAD_NODES  # noqa: F401
from .graphs.quantize import (blockwise_weights, calibration_batches, calibration_sample,  # noqa: F401
                              fix_activation_scales, quantize_int8, quantize_weights)
from .graphs.runners import TRAIN_PAD_MULTIPLE  # noqa: F401
from .models.device import use_device  # noqa: F401
from .models.onnx_ops import MASK_FILL  # noqa: F401
from .models.prompts import PromptSpec  # noqa: F401
from .recipe import Recipe  # noqa: F401
from .training.chat import CHAT_FORMAT, DEFAULT_INIT_TEXT  # noqa: F401
from .training.classifier import prepare  # noqa: F401
from .training.hard import FeatureCache, Verbalizer, head_logits, lm_zero_shot_head, zero_shot_head  # noqa: F401
from .training.instruct import build_model as build_lm_model, reference as lm_reference  # noqa: F401
from .training.loop import TrainStep, bucketed_batches, lr_schedule  # noqa: F401
