"""``python -m kommo_talks.cli``: the same as the ``kommo-talks`` console script."""

from . import main

main()
