"""pt-build's entry point: a missing build extra is one line, before anything that needs it is imported."""

import sys

from . import MISSING

if not MISSING:
    from .cli import main as run


def main():
    if MISSING:
        print(f"Error: pt-build needs the build extra ({', '.join(MISSING)} not installed):"
              f" pip install 'ptbundle[build]'", file=sys.stderr)
        sys.exit(1)
    run()
