"""`pt-build instruct`: a causal LM's soft prompt trained on instructions, written as a generation bundle."""

from __future__ import annotations

from pathlib import Path

from ptbundle.runtime.data import INSTRUCTIONS_DIR

from ..backbones.backbone import Backbone, load_backbone
from ..bundles.generation import static_capacity, write_generation_bundle
from ..bundles.manifest import backbone_info
from ..bundles.writer import check_replaceable
from ..errors import RecipeError
from ..families import family_of
from ..models.device import use_device
from .export import Built
from ..recipe import Recipe
from ..training.chat import CHAT_FORMAT, read_instructions
from ..training.instruct import reference, train_prompt


def instruct(destination, recipe: Recipe | None = Recipe(), *, backbone="smollm2", train_file=None, dev_file=None,
             device: str = "CPU", quantize: bool = False, mindir_capacity: int | None = None, log=print) -> Built:
    """`pt-build instruct`: the shipped instructions (data/instructions/) unless files are given."""
    train_file = Path(train_file or INSTRUCTIONS_DIR / "train.jsonl")
    dev_file = Path(dev_file or INSTRUCTIONS_DIR / "dev.jsonl")
    check_replaceable(Path(destination))
    use_device(device)
    bb = load_backbone(backbone)
    check_replaceable(Path(destination), bb.sha256)
    return build_generation(destination, bb, recipe, train_file, dev_file, device, quantize, log, mindir_capacity)


def build_generation(destination: Path, backbone: Backbone, recipe: Recipe | None, train_file, dev_file, device: str,
                     quantize: bool, log, mindir_capacity: int | None = None) -> Built:
    """A generation bundle of a causal LM: with `recipe`, a soft prompt trained with the LM loss on instruction
    data (builder.training.instruct) whose KV cache starts every cache; with None, the model alone (a baseline)."""
    family = family_of(backbone)
    if not family.generates:
        raise RecipeError(f"{backbone.name} is an encoder ({backbone.config.model_type}): generation needs a causal"
                          f" LM (--backbone smollm2, a Llama .gguf or checkpoint directory)")
    static_capacity(mindir_capacity, backbone.config, recipe.virtual_tokens if recipe else 0)  # before training
    train_examples, dev_examples = read_instructions(train_file), read_instructions(dev_file)
    cache, metrics, check, method = None, {}, None, "none"
    if recipe is not None:
        family.check_recipe(recipe, backbone)
        if recipe.label_smoothing:  # builder.training.instruct.LMTrainStep has a loss of its own, over the vocabulary
            raise RecipeError(f"--label-smoothing {recipe.label_smoothing}: pt-build instruct trains with the LM loss"
                              f" on the answers, which takes no label smoothing")
        if recipe.method == "prefix-tuning" and recipe.layer:
            raise RecipeError(f"--layer {recipe.layer}: a generation bundle's prompt cache covers every layer"
                              f" (a prefix from layer 0)")
        model, curve, metrics = train_prompt(backbone, train_examples, dev_examples, recipe, log)
        cache, check, method = model.prompt_cache(), reference(model), recipe.method
    log(f"writing the generation bundle {destination}{' (and its int8 graph)' if quantize else ''}")
    written = write_generation_bundle(
        destination, backbone.weights, backbone.config, backbone.tokenizer_path, cache,
        name=Path(destination).name, template=CHAT_FORMAT.template,
        details={"train": str(train_file), "dev": str(dev_file), "stop": CHAT_FORMAT.end},
        backbone=backbone_info(backbone), device=device, quantize=quantize, prompt_method=method,
        recipe=recipe.to_json() if recipe is not None else {}, metrics=metrics, reference=check,
        mindir_capacity=mindir_capacity)
    return Built(Path(destination), "generate", written.only.metrics, "")
