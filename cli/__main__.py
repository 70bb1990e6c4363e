"""``python -m cli``: the same as the ``linkctl`` console script."""

from cli.main import main

main()
