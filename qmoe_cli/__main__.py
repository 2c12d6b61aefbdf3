"""`python -m qmoe_cli` is the `qmoe` command."""

from .cli import main

main(prog_name="qmoe")
