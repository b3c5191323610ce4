"""What the command-line scripts share: one-line errors and exit status 2 for bad input."""

import argparse
import sys

from bitfit.errors import InputError, Interrupted


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is reported in one line rather than usage + error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_main(main, argv=None) -> int:
    """Run main(argv); turn InputError into one line on stderr and exit status 2."""
    try:
        main(argv)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        return 130  # the shell's convention for "ended by Ctrl-C"
    return 0
