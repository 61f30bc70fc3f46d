"""``python -m diffcurate.cli``: the same command line as the ``diffcurate`` script."""

from diffcurate.cli import main

main()
