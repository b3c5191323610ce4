"""The one exception type that means "the user can fix this"."""


class InputError(Exception):
    """Bad input from the user: a missing file, a wrong column, a flag out of range.

    The command-line tools print it as a single line and exit with status 2. Everything
    else that goes wrong inside the package is a bug and is allowed to raise normally.
    """
