"""From a dataset and a recipe to bundles on disk: the soft bundle, the hard ones, the comparison.

`pt-build export` is a thin layer of options over these functions.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from ptbundle.runtime.format import BackboneInfo, Manifest, Task
from ptbundle.runtime.template import Template
from ptbundle.runtime.text import load_tokenizer

from .backbone import Backbone
from .errors import BuildError, RecipeError
from .recipe import Recipe

# Chosen on MR dev only, by bench/experiments/zero_shot_search.py (README, "Soft and hard
# prompts"); other tasks default to the bare text and the label names.
MR_TEMPLATE = "{text} All in all, the movie was"
MR_LABEL_TEXTS = ("positive=The critic loved the film.", "positive=A positive review of a good movie.",
                  "negative=The critic hated the film.", "negative=A negative review of a bad movie.")


@dataclass
class Built:
    """One bundle written, for the comparison table."""

    path: Path
    kind: str  # "soft", "hard zero-shot" or "hard probe"
    metrics: dict
    command: str  # the pt-build command that rebuilds just this bundle


# A causal LM reads the task as an instruction in its chat format (ChatML: SmolLM2-Instruct's) and is read
# at the answer slot, the template's end; its labels are single words.  Chosen on MR dev by
# bench/experiments/decoder_zero_shot.py (README, "Decoders").
MR_DECODER_TEMPLATE = ("<|im_start|>user\nWhat is the sentiment of this movie review?\n{text}<|im_end|>\n"
                       "<|im_start|>assistant\nThe sentiment of this review is")
DECODER_TEMPLATE = "<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\nThe answer is"
DECODER_PAIR_TEMPLATE = "<|im_start|>user\n{text}\n{text_b}<|im_end|>\n<|im_start|>assistant\nThe answer is"
MR_LABEL_WORDS = ("positive=positive", "negative=negative")


def default_template(dataset, decoder: bool = False) -> str:
    if decoder:
        return MR_DECODER_TEMPLATE if dataset.name == "mr" else DECODER_PAIR_TEMPLATE if dataset.is_pair \
            else DECODER_TEMPLATE
    if dataset.name == "mr":
        return MR_TEMPLATE
    return "{text} {text_b}" if dataset.is_pair else "{text}"


def default_label_texts(dataset, decoder: bool = False) -> tuple:
    """Zero-shot label descriptions (an encoder's) or label words (a decoder's: the label's own name if none)."""
    if dataset.name != "mr":
        return ()
    return MR_LABEL_WORDS if decoder else MR_LABEL_TEXTS


def base_manifest(dataset, backbone: Backbone, recipe: Recipe, device: str, /, **fields) -> Manifest:
    """A one-task manifest for this build; `fields` add or override what the task's kind knows (kind, head,
    metrics, the recipe fields it records...)."""
    cfg = backbone.config
    task = dict(name=dataset.name, labels=tuple(dataset.labels), pair=dataset.is_pair, max_length=recipe.max_length,
                pooling="last" if backbone.is_decoder else recipe.pooling, recipe=recipe.to_json())
    return Manifest(tasks=(Task(**{**task, **fields}),), pad_id=cfg.pad_token_id, device=device,
                    backbone=backbone_info(backbone))


def backbone_info(backbone: Backbone) -> BackboneInfo:
    cfg = backbone.config
    return BackboneInfo(name=backbone.name, model_type=cfg.model_type, hidden_size=cfg.hidden_size,
                        layers=cfg.num_layers, heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                        vocab_size=cfg.vocab_size, sha256=backbone.sha256)


def check_fits(recipe: Recipe, backbone: Backbone, soft: bool) -> None:
    """The recipe's prompt fits the backbone: its layer exists, and the longest input has position embeddings."""
    from .errors import RecipeError
    from .prompts import PromptSpec

    spec = recipe.prompt_spec() if soft else PromptSpec()
    if spec.layer >= backbone.config.num_layers:
        raise RecipeError(f"--layer {recipe.layer}: {backbone.name} has layers 0-{backbone.config.num_layers - 1}")
    check_dropout(recipe, backbone)
    check_positions(recipe.max_length, spec, backbone, RecipeError)


def check_dropout(recipe: Recipe, backbone: Backbone) -> None:
    if recipe.dropout and backbone.is_decoder:  # builder.model.TrainDropout sits in the encoder only
        raise RecipeError(f"--dropout {recipe.dropout}: {backbone.name} is a decoder, trained here without dropout"
                          f" (as Llama checkpoints are)")


def check_positions(max_length: int, spec, backbone: Backbone, error: type) -> None:
    """--max-length text tokens and the prompt's positions (builder.prompts: prompt tuning's tokens take some, a
    prefix shifts the text's) must have position embeddings in the backbone."""
    cfg = backbone.config
    room, needed = cfg.max_positions - cfg.position_offset, max_length + spec.positions()
    if needed > room:
        raise error(f"--max-length {max_length}" + (f" + {spec.virtual_tokens} virtual tokens" if needed > max_length
                    else "") + f" = {needed} positions; {backbone.name} has {room}")


def int8_inputs(backbone: Backbone, dataset, recipe: Recipe, template=None):
    """The int8 graph's calibration batches (a sample of training texts) and the splits it is scored on."""
    from ptbundle.runtime.text import encode

    from .quantize import Int8Inputs, calibration_batches, calibration_sample
    from .train import encode_split

    tokenizer = load_tokenizer(backbone.tokenizer_path, recipe.max_length)
    sample = calibration_sample(dataset.train)
    texts_b = [e.text_b for e in sample] if dataset.is_pair else None
    calibration = calibration_batches(encode(tokenizer, [e.text for e in sample], texts_b, template),
                                      backbone.config.pad_token_id)
    return Int8Inputs(calibration, {split: (*encode_split(tokenizer, dataset, split, template), len(dataset.labels))
                                    for split in ("dev", "test") if getattr(dataset, split)})


def build_soft(destination: Path, backbone: Backbone, dataset, recipe: Recipe, device: str, quantize: bool,
               command: str, log, checkpoints=None, template: Template | None = None, label_texts=()) -> Built:
    """`checkpoints` (builder.checkpoint.Checkpoints): save the training state as it goes; removed once the
    bundle is written.  A decoder reads its inputs through `template` and starts its head from the label
    words `label_texts` ("label=word"); an encoder's soft prompt takes the text alone."""
    from .export import write_bundle
    from .hard import Verbalizer
    from .train import train

    from .parallel import world

    words = Verbalizer.parse(label_texts, dataset.labels).descriptions if backbone.is_decoder else None
    template = template if backbone.is_decoder else None
    net, curve, metrics = train(backbone, dataset, recipe, log=log, checkpoints=checkpoints, template=template,
                                label_words=words)
    if not world().leader:  # under msrun, rank 0 writes the bundle
        return None
    net = net.folded()  # a prefix's reparameterization becomes its table
    details = net.spec.details() if words is None else {**net.spec.details(), "label_words": words}
    manifest = base_manifest(dataset, backbone, recipe, device, kind="soft",
                             head="label-words" if backbone.is_decoder else "linear",
                             prompt_method=recipe.method, num_virtual_tokens=recipe.virtual_tokens,
                             template=template.source if template is not None else None,
                             details=details, metrics=metrics)
    written = write_bundle(destination, net, backbone, manifest, curve,
                           int8_inputs(backbone, dataset, recipe, template) if quantize else None)
    if checkpoints is not None:
        checkpoints.path.unlink(missing_ok=True)  # the bundle holds what it was for
    return Built(destination, written.kind_label, written.only.metrics, command)


def build_hard(destinations: dict, backbone: Backbone, dataset, recipe: Recipe, template: Template,
               label_texts, device: str, quantize: bool, commands: dict, log) -> list:
    """The hard-prompt bundles named in `destinations` ({head: path}), sharing one pass of the encoder."""
    from .export import write_bundle
    from .hard import HEADS, FeatureCache, Verbalizer

    cache = FeatureCache(backbone, dataset, recipe, template, log, device)
    verbalizer = Verbalizer.parse(label_texts, dataset.labels)
    if "probe" in destinations:
        # The probe reads every training text; encoded first, they also give the
        # zero-shot calibration its sample, which would otherwise run the encoder
        # over 2,000 of them a second time.
        cache.split("train")
    built = []
    for head, destination in destinations.items():
        result = HEADS[head](cache, backbone, recipe, verbalizer, log)
        manifest = base_manifest(dataset, backbone, recipe, device, kind="hard", head=head, prompt_method="none",
                                 num_virtual_tokens=0, template=template.source, recipe=result.recipe,
                                 details=result.details, metrics=result.metrics)
        written = write_bundle(destination, result.net, backbone, manifest, result.curve,
                               int8_inputs(backbone, dataset, recipe, template) if quantize else None)
        log(f"wrote {destination}: dev accuracy {written.only.metrics['dev']['accuracy']:.4f}")
        built.append(Built(destination, written.kind_label, written.only.metrics, commands[head]))
    return built


def build_hard_apart(destinations: dict, backbone_arg, dataset, recipe: Recipe, template: Template, label_texts,
                     device: str, quantize: bool, commands: dict) -> list:
    """build_hard in a process of its own, which gives its memory back when it ends.

    MindSpore's CPU allocator keeps what each compiled graph took until the
    process exits: with SmolLM2 the zero-shot bundle's export left 7.6 GB
    behind, and the soft prompt's training then went past the machine's
    24 GB and was killed (README, "Decoders").  The child loads the backbone
    itself (a GGUF's conversion is cached) and logs to the same stderr."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(build_hard_child, destinations, backbone_arg, dataset, recipe, template, label_texts,
                               device, quantize, commands).result()
        except BrokenProcessPool:
            raise BuildError("the hard-prompt bundles' process died (out of memory?) before it finished: build"
                             " them alone with --prompt hard") from None


def build_hard_child(destinations, backbone_arg, dataset, recipe, template, label_texts, device, quantize,
                     commands) -> list:
    import sys

    from .backbone import load_backbone
    from .model import use_device

    use_device(device)
    return build_hard(destinations, load_backbone(backbone_arg), dataset, recipe, template, label_texts, device,
                      quantize, commands, lambda message: print(message, file=sys.stderr, flush=True))


def comparison_table(built: list, eval_args: list) -> str:
    """One row per bundle: accuracy and macro-F1 on dev and test, and the commands that reproduce them."""
    width = max(len(str(b.path)) for b in built)
    int8 = any(b.metrics.get("int8") for b in built)
    header = (f"{'bundle':<{width}}  {'kind':<14} {'dev acc':>8} {'test acc':>8} {'test F1':>8}"
              + (f" {'int8 test':>9}" if int8 else ""))
    lines = [header, "-" * len(header)]
    for b in built:
        dev, test = b.metrics.get("dev") or {}, b.metrics.get("test") or {}
        line = (f"{str(b.path):<{width}}  {b.kind:<14} {percent(dev, 'accuracy'):>8} "
                f"{percent(test, 'accuracy'):>8} {percent(test, 'macro_f1'):>8}")
        if int8:
            line += f" {percent((b.metrics.get('int8') or {}).get('test') or {}, 'accuracy'):>9}"
        lines.append(line)
    lines += ["", "each row is rebuilt by:"] + [f"  {b.command}" for b in built]
    lines += ["and scored again from the bundles' files by:",
              "  " + shlex.join(["pt-run", "eval"] + [x for b in built for x in ("--bundle", str(b.path))] + eval_args)]
    return "\n".join(lines)


def percent(metrics: dict, key: str) -> str:
    return f"{100 * metrics[key]:.2f}" if key in metrics else "-"


def build_generation(destination: Path, backbone: Backbone, recipe: Recipe | None, train_file, dev_file, device: str,
                     quantize: bool, log, mindir_capacity: int | None = None) -> Built:
    """A generation bundle of a causal LM: with `recipe`, a soft prompt trained with the LM loss on instruction
    data (builder.instruct) whose KV cache starts every cache; with None, the model alone (a baseline)."""
    from .generation import static_capacity, write_generation_bundle
    from .instruct import CHAT_FORMAT, read_instructions, reference, train_prompt

    if not backbone.is_decoder:
        raise RecipeError(f"{backbone.name} is an encoder ({backbone.config.model_type}): generation needs a causal"
                          f" LM (--backbone smollm2, a Llama .gguf or checkpoint directory)")
    static_capacity(mindir_capacity, backbone.config, recipe.virtual_tokens if recipe else 0)  # before training
    train_examples, dev_examples = read_instructions(train_file), read_instructions(dev_file)
    cache, metrics, check, method = None, {}, None, "none"
    if recipe is not None:
        check_dropout(recipe, backbone)
        if recipe.label_smoothing:  # builder.instruct.LMTrainStep has a loss of its own, over the vocabulary
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
