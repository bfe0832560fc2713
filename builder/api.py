"""Building bundles from Python: the same pipelines `pt-build` runs, as functions.

    from ptbundle.builder import Recipe, build, load_data

    built = build(load_data(train="reviews.tsv", dev="reviews-dev.tsv"), Recipe(epochs=2), prompt="soft",
                  out="exports", name="reviews")
    print(built[0].path, built[0].metrics["dev"]["accuracy"])

`build` trains and writes bundles (soft and hard, as `pt-build export`), `import_adapter` folds a PEFT adapter
(`pt-build import`), `merge` joins bundles (`pt-build merge`), `instruct` trains a generation prompt
(`pt-build instruct`).  Every error is a `PtbundleError` whose message names the file, line or option.
"""

from __future__ import annotations

from ptbundle.runtime.data import Columns, Dataset, load_files, load_mr
from ptbundle.runtime.errors import PtbundleError

from .backbones.backbone import Backbone, load_backbone
from .pipelines.export import Built, export as build
from .pipelines.import_adapter import import_adapter
from .pipelines.instruct import instruct
from .pipelines.merge import merge
from .recipe import Recipe

__all__ = ["Backbone", "Built", "Columns", "Dataset", "PtbundleError", "Recipe", "build", "import_adapter",
           "instruct", "load_backbone", "load_data", "merge"]


def load_data(name: str = "mr", *, train=None, dev=None, test=None, text_column: str = "text",
              text_b_column: str | None = None, label_column: str = "label") -> Dataset:
    """The shipped MR (canonical split), or labelled files (.tsv, .csv, .jsonl): train and dev, test optional."""
    if train or dev:
        if not (train and dev):
            raise PtbundleError("train and dev files go together (test is optional)")
        return load_files(train, dev, test, Columns(text_column, label_column, text_b_column))
    if name != "mr":
        raise PtbundleError(f"unknown dataset {name!r}: use 'mr' or train/dev files")
    return load_mr()
