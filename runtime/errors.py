"""The one error hierarchy: every mistake a user can make is a `PtbundleError`.

Each command of `pt-build` and `pt-run` turns one into a single
`Error: ...` line and exit status 1 (`ErrorsAsMessages`, the
click group both CLIs use), so no user mistake ends in a traceback.  The builder's
errors (backbone, recipe, export) subclass `PtbundleError` in
`ptbundle.builder.errors`; the runtime never imports them.
"""

from __future__ import annotations

import click


class PtbundleError(ValueError):
    """Base of every user-facing error; the message is one line naming file, line or field."""

    exit_code = 1  # the CLIs' exit status for it (2: options that do not go together, as click's usage errors)


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


class ErrorsAsMessages(click.Group):
    """A click group whose commands report `PtbundleError`s as `Error: message` and exit 1.

    In the group, not in `main()`: click's test runner invokes the group, so
    the tests see exactly what a user sees.  pt-build uses it too.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PtbundleError as e:
            error = click.ClickException(str(e))
            error.exit_code = e.exit_code
            raise error from e
