"""What a run stores, one word per kind of file, each written atomically.

    files       atomic writes (JSON, torch.save, model folders), finite-value checks
    delta       a delta: the trained biases (bias.safetensors), tied to their base; applying and checking it
    merge       a delta merged into its base for good, as an ordinary model folder (export --format hf)
    gguf_export a delta inside a copy of its GGUF base file, for llama.cpp (export --format gguf)
    peft_export a delta as a PEFT (BEFT) adapter (export --format peft)
    run_folder  the run folder as a transaction: staging beside it, a lock, the swap, cleanup
    checkpoint  a training checkpoint (checkpoint.pt): what --resume continues from; Ctrl-C
    metrics     metrics.jsonl (and TensorBoard's event files), memory and throughput, the summary table

May import: the standard library, torch, numpy, safetensors, transformers, tqdm, gguf, peft;
bitfit.errors, bitfit.config, bitfit.core, bitfit.data, bitfit.model
"""
