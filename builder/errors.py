"""The builder's user-facing errors, under the runtime's one hierarchy (runtime.errors)."""

from ptbundle.runtime.errors import DataError, PtbundleError, TemplateError  # noqa: F401  (one import site)


class BuildError(PtbundleError):
    """Base of the builder's own errors."""


class BackboneError(BuildError):
    """A backbone directory that cannot be used, with the reason."""


class RecipeError(BuildError):
    """A recipe (options of pt-build) that cannot be trained, with the field and the reason."""


class ExportError(BuildError):
    """A graph that could not be written or does not match the trained model."""


class OptionConflict(RecipeError):
    """Options that do not go together (exit status 2, as click's own usage errors)."""

    exit_code = 2
