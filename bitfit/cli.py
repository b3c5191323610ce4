"""What the command-line scripts share: one-line errors and exit status 2 for bad input."""

import argparse
import sys

from bitfit.errors import TORCHAO_IMPORT_NOISE, InputError, Interrupted, library_logs_silenced


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is reported in one line rather than usage + error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_main(main, argv=None) -> int:
    """Run main(argv); turn InputError into one line on stderr and exit status 2."""
    try:
        # transformers imports torchao whenever it is installed, with or without --quantize.
        with library_logs_silenced(TORCHAO_IMPORT_NOISE):
            main(argv)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        return 130  # the shell's convention for "ended by Ctrl-C"
    return 0
