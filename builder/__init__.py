"""ptbundle's builder: trains prompts on frozen backbones with MindSpore and writes bundles.

The public API is builder.api, re-exported here (`from ptbundle.builder import Recipe, build`); docs/architecture.md
maps the layers below it.
"""

import mindspore  # noqa: F401  (before onnx, whatever is imported first: see builder.models.onnx_ops)

from .api import (Backbone, Built, Columns, Dataset, PtbundleError, Recipe, build,  # noqa: F401
                                  import_adapter, instruct, load_backbone, load_data, merge)
