"""The ``kommo-talks`` command line, built on click and rich.

``main`` is the console script's entry point. This module imports neither
click nor rich until ``main`` runs, and ``import kommo_talks`` never imports
this module, so the core SDK stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run ``kommo-talks`` with ``argv`` (default: ``sys.argv[1:]``) and exit.

    Exit status: 0 success, 1 a talk failed or Kommo answered an error, 2 a
    usage error (bad arguments or input, missing credentials), 130 interrupted.
    """
    from ._accounts import accounts
    from ._app import cli
    from ._webhooks import webhooks

    cli.add_command(accounts)
    cli.add_command(webhooks)

    cli.main(args=list(argv) if argv is not None else None, prog_name="kommo-talks")
    raise SystemExit(0)  # not reached: click exits (standalone mode)
