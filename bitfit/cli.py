"""What the command-line scripts share: one-line errors and their exit statuses."""

import argparse
import re
import sys

from bitfit.errors import TORCHAO_IMPORT_NOISE, Diverged, InputError, Interrupted, library_logs_silenced


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is reported in one line rather than usage + error."""

    def error(self, message):
        # "-1,2" looks like a flag to argparse, which then says only "expected one argument": say what it takes.
        flag = re.fullmatch(r"argument ([-\w/]+): expected one argument", message)
        action = next((action for action in self._actions if flag and flag.group(1) in action.option_strings), None)
        if action is not None and action.help:
            message += f"; {action.option_strings[-1]} takes {action.metavar or action.dest.upper()}: {action.help}"
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_main(main, argv=None) -> int:
    """Run main(argv); turn the errors a user meets into one line on stderr and an exit status:
    2 for bad input (InputError), 3 for a run that diverged (Diverged), 130 for Ctrl-C (Interrupted)."""
    try:
        # transformers imports torchao whenever it is installed, with or without --quantize.
        with library_logs_silenced(TORCHAO_IMPORT_NOISE):
            main(argv)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Diverged as error:
        print(f"diverged: {error}", file=sys.stderr)
        return 3
    except Interrupted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        return 130  # the shell's convention for "ended by Ctrl-C"
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (loading, say), or a second one inside it
        print("stopped: Ctrl-C; what was being written was left as it was before", file=sys.stderr)
        return 130
    return 0
