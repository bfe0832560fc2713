"""The one error hierarchy: every mistake a user can make is a `PtbundleError`.

Each command of `pt-build` and `pt-run` turns one into a single
`Error: ...` line and exit status 1 (`runtime.cli.ErrorsAsMessages`, the
click group both CLIs use), so no user mistake ends in a traceback.  The builder's
errors (backbone, recipe, export) subclass `PtbundleError` in
`ptbundle.builder.errors`; the runtime never imports them.
"""

from __future__ import annotations


class PtbundleError(ValueError):
    """Base of every user-facing error; the message is one line naming file, line or field."""


class DataError(PtbundleError):
    """A data file that cannot be used; the message names file and line."""


class BundleError(PtbundleError):
    """A bundle that cannot be loaded, with the reason."""


class TemplateError(PtbundleError):
    """A hard-prompt template that cannot be used, with the reason."""


class InputError(PtbundleError):
    """Input lines or requests that cannot be predicted on."""


class DeviceError(PtbundleError):
    """A device MindSpore cannot use in this process (not installed here, or another one already chosen)."""
