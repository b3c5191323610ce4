"""bitfit: fine-tune only the bias terms of a causal language model (BitFit).

One module per idea:
    config      the run's settings (one dataclass)
    data        prompt template, tokenization, label masking, collate, batch order
    model       loading models and tokenizers, the built-in tiny default
    bias        which parameters train, freezing the rest, counting
    loss        the token-weighted causal-LM loss
    loop        the training loop itself
    checkpoint  bias deltas and model folders on disk, written atomically
    metrics     memory, throughput, the summary
    run         a training run from settings to files: setup, loop, save
"""

from bitfit.errors import InputError

__all__ = ["InputError"]
