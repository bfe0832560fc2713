import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for checkpoints.py
# runtime.tuning records what it measures per CPU: here, in a directory of this run (CLI and server processes the
# tests start inherit it), not in the home directory.
os.environ.setdefault("PTBUNDLE_CACHE_DIR", tempfile.mkdtemp(prefix="ptbundle-test-cache-"))

from checkpoints import write_checkpoint  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def cpu_graph_mode():
    from ptbundle.builder.models.device import use_device

    use_device("CPU")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny-roberta"), "roberta")


def write_tsv(path, rows, header=("text", "label")):
    lines = ["\t".join(header)] + ["\t".join(r) for r in rows]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def toy_rows(n, seed=0):
    """A learnable toy task over the tiny vocabulary: 'great'/'best' -> pos."""
    import random

    rng = random.Random(seed)
    good = ["a great movie", "the best film ever", "great acting and a great story", "the best script"]
    bad = ["a dull movie", "the worst film ever", "boring acting and a weak story", "the worst script"]
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        rows.append((rng.choice(good if label == "pos" else bad), label))
    return rows


@pytest.fixture(scope="session")
def toy_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    return write_tsv(d / "train.tsv", toy_rows(64)), write_tsv(d / "dev.tsv", toy_rows(24, seed=1))


TOY_TEMPLATE = "this movie , {text} it was"
TOY_LABEL_TEXTS = ("pos=great", "pos=best", "neg=dull", "neg=worst")


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory, tiny_bert, toy_files):
    """Real bundles built by the real CLI from the tiny checkpoint: the soft prompt and both hard heads.

    Returns (exports dir, pt-build's stdout).
    """
    from click.testing import CliRunner

    from ptbundle.builder.cli import cli

    out = tmp_path_factory.mktemp("exports")
    train, dev = toy_files
    label_texts = [x for t in TOY_LABEL_TEXTS for x in ("--label-text", t)]
    result = CliRunner().invoke(cli, ["export", "--train", str(train), "--dev", str(dev), "--test", str(dev),
                                      "--backbone", str(tiny_bert), "--virtual-tokens", "4", "--epochs", "2",
                                      "--batch-size", "8", "--prompt-lr", "0.05", "--head-lr", "0.05",
                                      "--template", TOY_TEMPLATE, *label_texts,
                                      "--out", str(out), "--name", "toy", "--quantize", "int8"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out, result.stdout


@pytest.fixture(scope="session")
def tiny_bundle(tiny_build):
    return tiny_build[0] / "toy-soft"


def build(args):
    from click.testing import CliRunner

    from ptbundle.builder.cli import cli as build_cli

    result = CliRunner().invoke(build_cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="session")
def merged_bundle(tmp_path_factory, tiny_build, tiny_bert, toy_files):
    """Every kind a merge folds, on one checkpoint: the toy task as the default prefix (from layer 0, with its
    int8 graph), a shallow prompt, a prefix from layer 1 and a late prompt entering at layer 1 with cls pooling;
    the two hard bundles (no prompt; the zero-shot head normalizes); and a task unlike the toy one in every way
    the merge must handle: sentence pairs, three labels, cls pooling, a shorter prompt."""
    d = tmp_path_factory.mktemp("pairs3")
    train, dev = toy_files
    build(["export", "--train", str(train), "--dev", str(dev), "--backbone", str(tiny_bert), "--method",
           "prompt-tuning", "--virtual-tokens", "4", "--epochs", "2", "--batch-size", "8", "--prompt-lr", "0.05",
           "--head-lr", "0.05", "--prompt", "soft", "--out", str(d), "--name", "toy-shallow"])
    for name, options in (("toy-prefix1", ["--method", "prefix-tuning", "--layer", "1", "--virtual-tokens", "2"]),
                          ("toy-late", ["--method", "late-prompt", "--layer", "1", "--virtual-tokens", "3",
                                        "--pooling", "cls"])):
        build(["export", "--train", str(train), "--dev", str(dev), "--backbone", str(tiny_bert), *options,
               "--epochs", "1", "--batch-size", "8", "--prompt-lr", "0.05", "--head-lr", "0.05", "--prompt", "soft",
               "--out", str(d), "--name", name])
    rows = [("a great movie", "the best film", "same"), ("a great movie", "the worst film", "opposite"),
            ("a dull movie", "the best script", "other")] * 8
    write_tsv(d / "train.tsv", rows, ("s1", "s2", "q"))
    build(["export", "--train", str(d / "train.tsv"), "--dev", str(d / "train.tsv"), "--text-column", "s1",
           "--text-b-column", "s2", "--label-column", "q", "--backbone", str(tiny_bert), "--virtual-tokens", "2",
           "--method", "prompt-tuning", "--pooling", "cls", "--epochs", "1", "--batch-size", "8", "--prompt", "soft", "--out", str(d),
           "--name", "pairs"])
    exports = tiny_build[0]
    sources = {"sentiment": d / "toy-shallow", "zeroshot": exports / "toy-hard-zeroshot",
               "probe": exports / "toy-hard-probe", "pairs": d / "pairs", "prefix": exports / "toy-soft",
               "prefix1": d / "toy-prefix1", "late": d / "toy-late"}
    out = d / "merged"
    result = build(["merge", *(f"{k}={v}" for k, v in sources.items()), "--out", str(out),
                    "--backbone", str(tiny_bert)])
    assert "7 tasks" in result.stdout
    return out, sources


MIXED_TEXTS = ["a great movie", "the worst film ever", "boring acting and a weak story but the best script",
         "great", "the best film ever , great acting and a great story and the best script"]


def mixed_rows(n, seed=0):
    """(task, text, text_b) rows over merged_bundle's tasks."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        task = rng.choice(["sentiment", "zeroshot", "probe", "pairs", "prefix", "prefix1", "late"])
        rows.append((task, rng.choice(MIXED_TEXTS), rng.choice(MIXED_TEXTS) if task == "pairs" else None))
    return rows
