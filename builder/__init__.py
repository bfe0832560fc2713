"""ptbundle's builder: trains prompts on frozen backbones with MindSpore and writes bundles.

The public API is builder.api, re-exported here (`from ptbundle.builder import Recipe, build`); docs/architecture.md
maps the layers below it.  It needs the build extra (pip install 'ptbundle[build]'); without it the runtime
still works, and pt-build (builder.main) says what is missing in one line.
"""

import importlib.util

MISSING = tuple(m for m in ("mindspore", "safetensors", "onnx") if importlib.util.find_spec(m) is None)

if not MISSING:
    import mindspore  # noqa: F401  (before onnx, whatever is imported first: see builder.models.onnx_ops)

    from .api import (Backbone, Built, Columns, Dataset, PtbundleError, Recipe, build,  # noqa: F401
                      import_adapter, instruct, load_backbone, load_data, merge)
