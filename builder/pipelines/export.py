"""From a dataset and a recipe to bundles on disk: the soft bundle, the hard ones, the comparison.

`export` is the whole of `pt-build export` (a thin layer of options over it) and of
`ptbundle.builder.build` in Python.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from ptbundle.runtime.template import Template
from ptbundle.runtime.text import encode, load_tokenizer

from ..backbones.backbone import Backbone, load_backbone
from ..bundles.classifier import write_bundle
from ..bundles.writer import check_replaceable
from ..bundles.manifest import base_manifest
from ..errors import BuildError, OptionConflict, RecipeError
from ..models.prompts import PromptSpec
from ..families import family_of
from ..graphs.quantize import Int8Inputs, calibration_batches, calibration_sample
from ..models.device import use_device
from ..recipe import Recipe, check_positions
from ..training.checkpoint import Checkpoints
from ..training.classifier import train
from ..training.forward import encode_split
from ..training.hard import HEADS, FeatureCache, Verbalizer
from ..training.parallel import world


@dataclass
class Built:
    """One bundle written, for the comparison table."""

    path: Path
    kind: str  # "soft", "hard zero-shot" or "hard probe"
    metrics: dict
    command: str  # the pt-build command that rebuilds just this bundle


def check_fits(recipe: Recipe, backbone: Backbone, soft: bool) -> None:
    """The recipe's prompt fits the backbone: its layer exists, its family trains it, and the longest input has
    position embeddings."""
    spec = recipe.prompt_spec() if soft else PromptSpec()
    if spec.layer >= backbone.config.num_layers:
        raise RecipeError(f"--layer {recipe.layer}: {backbone.name} has layers 0-{backbone.config.num_layers - 1}")
    family_of(backbone).check_recipe(recipe, backbone)
    check_positions(recipe.max_length, spec, backbone, RecipeError)


def int8_inputs(backbone: Backbone, dataset, recipe: Recipe, template=None):
    """The int8 graph's calibration batches (a sample of training texts) and the splits it is scored on."""
    tokenizer = load_tokenizer(backbone.tokenizer_path, recipe.max_length)
    sample = calibration_sample(dataset.train)
    texts_b = [e.text_b for e in sample] if dataset.is_pair else None
    calibration = calibration_batches(encode(tokenizer, [e.text for e in sample], texts_b, template),
                                      backbone.config.pad_token_id)
    return Int8Inputs(calibration, {split: (*encode_split(tokenizer, dataset, split, template), len(dataset.labels))
                                    for split in ("dev", "test") if getattr(dataset, split)})


def build_soft(destination: Path, backbone: Backbone, dataset, recipe: Recipe, device: str, quantize: bool,
               command: str, log, checkpoints=None, template: Template | None = None, label_texts=()) -> Built:
    """`checkpoints` (builder.training.checkpoint.Checkpoints): save the training state as it goes; removed once
    the bundle is written.  A family whose soft prompt reads a template (a decoder's) reads its inputs through
    `template` and starts its head from the label words `label_texts` ("label=word"); an encoder's soft prompt
    takes the text alone."""
    family = family_of(backbone)
    words = Verbalizer.parse(label_texts, dataset.labels).descriptions if family.soft_reads_template else None
    template = template if family.soft_reads_template else None
    net, curve, metrics = train(backbone, dataset, recipe, log=log, checkpoints=checkpoints, template=template,
                                label_words=words)
    if not world().leader:  # under msrun, rank 0 writes the bundle
        return None
    net = net.folded()  # a prefix's reparameterization becomes its table
    details = net.spec.details() if words is None else {**net.spec.details(), "label_words": words}
    manifest = base_manifest(dataset, backbone, recipe, device, family.pooling(recipe), name=destination.name,
                             kind="soft",
                             head=family.soft_head,
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
        manifest = base_manifest(dataset, backbone, recipe, device, family_of(backbone).pooling(recipe),
                                 name=Path(destination).name, kind="hard", head=head, prompt_method="none",
                                 num_virtual_tokens=0, template=template.source, recipe=result.recipe,
                                 details=result.details, metrics=result.metrics)
        written = write_bundle(destination, result.net, backbone, manifest, result.curve,
                               int8_inputs(backbone, dataset, recipe, template) if quantize else None)
        log(f"wrote {destination}: dev accuracy {written.only.metrics['dev']['accuracy']:.4f}")
        built.append(Built(destination, written.kind_label, written.only.metrics, commands.get(head, "")))
    return built


def build_hard_apart(destinations: dict, backbone_arg, dataset, recipe: Recipe, template: Template, label_texts,
                     device: str, quantize: bool, commands: dict) -> list:
    """build_hard in a process of its own, which gives its memory back when it ends.

    MindSpore's CPU allocator keeps what each compiled graph took until the
    process exits: with SmolLM2 the zero-shot bundle's export left 7.6 GB
    behind, and the soft prompt's training then went past the machine's
    24 GB and was killed (docs/measured.md).  The child loads the backbone
    itself (a GGUF's conversion is cached) and logs to the same stderr."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(build_hard_child, destinations, backbone_arg, dataset, recipe, template, label_texts,
                               device, quantize, commands).result()
        except BrokenProcessPool:
            raise BuildError("the hard-prompt bundles' process died (out of memory?) before it finished: build"
                             " them alone with --prompt hard") from None


def build_hard_child(destinations, backbone_arg, dataset, recipe, template, label_texts, device, quantize,
                     commands) -> list:
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


def export(dataset, recipe: Recipe = Recipe(), *, backbone=None, out="exports", prompt: str = "all", heads=None,
           name: str | None = None, template: str | None = None, label_texts=(), device: str = "CPU",
           quantize: bool = False, checkpoint_every: int = 500, resume: bool = False, log=print,
           commands=None) -> list:
    """Build the bundles of `dataset` under `out`: with prompt "all", the soft bundle and the hard ones (`heads`,
    default all of builder.training.hard.HEADS) side by side; "soft" or "hard" for one kind.  `backbone`: what
    --backbone names (None: the default encoder).  Returns a Built per bundle, in the order written.  Under msrun
    (builder.training.parallel) only the leader writes; the other workers return [].  `commands(template,
    label_texts, soft_reads_template)`: each bundle's command line for the comparison table (pt-build's)."""
    if prompt not in ("all", "soft", "hard"):
        raise RecipeError(f"--prompt {prompt!r}: choose all, soft or hard")
    heads = [] if prompt == "soft" else list(heads or HEADS)
    for head in heads:
        if head not in HEADS:
            raise RecipeError(f"--head {head!r}: choose one of {', '.join(HEADS)}")
    names = bundle_names(name, dataset.name, prompt != "hard", heads)
    use_device(device)
    workers = world()  # joins the group when msrun started this process (builder.training.parallel)
    if workers.size > 1:  # msrun names a dead worker by its pid: this line in its log gives the rank
        print(f"pt-build: worker rank {workers.rank} of {workers.size}, pid {os.getpid()}", file=sys.stderr)
    if workers.size > 1 and prompt != "soft":
        raise OptionConflict(f"{workers.size} workers (msrun) train a soft prompt: add --prompt soft")
    bb = load_backbone(backbone)
    family = family_of(bb)
    check_fits(recipe, bb, prompt != "hard")
    if not family.soft_reads_template and prompt == "soft" and (template or label_texts):
        # a decoder's soft prompt reads the text through a template and starts from label words; an encoder's
        # soft prompt takes the text alone
        raise OptionConflict(f"--{'template' if template else 'label-text'} is for hard prompts (or a decoder's"
                             f" soft prompt): it needs --prompt hard or all, not soft")
    template = Template.parse(template or family.default_template(dataset), pair=dataset.is_pair) \
        if heads or family.soft_reads_template else None
    label_texts = tuple(label_texts) or family.default_label_texts(dataset)
    commands = commands(template, label_texts, family.soft_reads_template) if commands else {}
    out = writable_directory(Path(out))  # before training: a build must not end where it cannot write
    destinations = {kind: out / bundle for kind, bundle in names.items()}
    for destination in destinations.values():
        check_replaceable(destination, bb.sha256)  # before training, not after it: nothing of the user's is lost
    saved = out / f".{names['soft']}.checkpoint.safetensors" if prompt != "hard" else None
    if resume and not (saved and saved.is_file()):
        raise BuildError(f"--resume: no checkpoint at {saved} (the run finished, or never reached one)")
    if not workers.leader:
        log = lambda message: None  # noqa: E731
    log(f"{dataset.name}: {len(dataset.train)} train / {len(dataset.dev)} dev / {len(dataset.test)} test, "
        f"labels {', '.join(dataset.labels)}; backbone {bb.name} ({bb.config.model_type}, "
        f"{bb.config.num_layers}x{bb.config.hidden_size})")
    built = []
    # MindSpore's CPU allocator keeps what earlier graphs took: an encoder's soft prompt (the main result)
    # goes first, as the order hardly moves its peak; a decoder's hard bundles are built first and in a
    # process of their own (build_hard_apart), since with SmolLM2 the two did not fit in one process's 24 GB.
    hard = {h: destinations[h] for h in heads}
    if family.hard_apart and hard and prompt != "hard":
        built += build_hard_apart(hard, backbone, dataset, recipe, template, label_texts, device, quantize, commands)
        hard = {}
    if prompt != "hard":
        saves = Checkpoints(saved, checkpoint_every, resume, "")
        soft = build_soft(destinations["soft"], bb, dataset, recipe, device, quantize, commands.get("soft", ""), log,
                          saves, template, label_texts)
        if not workers.leader:
            return []
        built.append(soft)
    if hard:
        built += build_hard(hard, bb, dataset, recipe, template, label_texts, device, quantize, commands, log)
    return built


def bundle_names(name, data_name: str, soft: bool, heads: list) -> dict:
    """One bundle: `name`, else <data>-soft / <data>-hard-zeroshot / <data>-hard-probe; several: `name` is the
    prefix."""
    suffixes = ({"soft": "soft"} if soft else {}) | {h: "hard-" + h.replace("-", "") for h in heads}
    if name and len(suffixes) == 1:
        return {k: name for k in suffixes}
    return {k: f"{name or data_name}-{v}" for k, v in suffixes.items()}


def writable_directory(path: Path) -> Path:
    """`path`, created if needed; a BuildError naming it if it cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"--out {path}: cannot create it ({e.strerror})") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise BuildError(f"--out {path}: not writable")
    return path
