"""Errors a user can act on: the CLI prints them as one line, without a traceback."""


class BuildError(ValueError):
    """Base of the builder's user-facing errors."""


class BackboneError(BuildError):
    """A backbone directory that cannot be used, with the reason."""

