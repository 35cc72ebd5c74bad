"""The ``kommo-talks`` command line (extra ``kommo-talks[cli]``: click and rich).

``main`` is the console script's entry point. This module imports neither
click nor rich until ``main`` runs, and ``import kommo_talks`` never imports
this module, so the core SDK stays light.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

__all__ = ["INSTALL_HINT", "main"]

INSTALL_HINT = "kommo-talks: the command line needs click and rich: pip install 'kommo-talks[cli]'"


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run ``kommo-talks`` with ``argv`` (default: ``sys.argv[1:]``) and exit.

    Exit status: 0 success, 1 a talk failed or Kommo answered an error, 2 a
    usage error (bad arguments or input, missing credentials), 130 interrupted.
    Without click or rich installed, prints :data:`INSTALL_HINT` and exits 2.
    """
    try:
        import click  # noqa: F401
        import rich  # noqa: F401
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        raise SystemExit(2) from None
    from ._app import cli

    cli.main(args=list(argv) if argv is not None else None, prog_name="kommo-talks")
    raise SystemExit(0)  # not reached: click exits (standalone mode)
