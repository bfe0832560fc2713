import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for checkpoints.py

from checkpoints import write_checkpoint  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def cpu_graph_mode():
    from ptbundle.builder.model import use_device

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
