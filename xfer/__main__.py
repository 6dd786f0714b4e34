"""`python -m xfer COMMAND ...` is the `xfer` command (xfer.cli)."""

from xfer.cli import entry

if __name__ == "__main__":
    entry()
