"""`python -m vmpod.cli` runs the `vmpod` command."""

from vmpod.cli.main import main

main()
