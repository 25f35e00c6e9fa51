"""``python -m compress``: the command line."""

from compress.cli import main

main()
