"""The errors the command-line tools report in one line (InputError, Diverged, Interrupted), and quiet loading.

Every layer of bitfit may import this module; it imports nothing of bitfit's.
"""

import contextlib
import logging


class InputError(Exception):
    """Bad input from the user: a missing file, a wrong column, a flag out of range.

    The command-line tools print it as a single line and exit with status 2. Everything
    else that goes wrong inside the package is a bug and is allowed to raise normally.
    """


# Logged while torchao is imported (by bitfit.model.quantize, and by transformers itself whenever torchao
# is installed): a CPU build's "Failed to load ..._C_cutlass_90a.abi3.so" for CUDA kernels that
# bitfit never uses, and torch's note on a deprecated pytree registration. Neither concerns a run.
TORCHAO_IMPORT_NOISE = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def library_logs_silenced(names=("datasets", "transformers", "huggingface_hub")):
    """Hush the named libraries' own log lines (by default the Hugging Face ones) for a while.

    When a load fails they log their view of it (parser errors, network retries) before
    raising; the user should see one line, ours, which names the file or id they gave.
    """
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class Diverged(Exception):
    """Training diverged: the loss or the gradient became inf or NaN, or the trained tensors hold them.

    Not the user's input at fault, but not a bug either: the run stops before writing anything,
    and the CLIs print one line and exit with status 3 (a lower --lr is the usual cure).
    """


class Interrupted(Exception):
    """Training stopped on Ctrl-C after saving a checkpoint; the CLIs exit with status 130."""
