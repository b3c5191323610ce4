"""The model: loading it, what trains in it, how it computes, and answering with it.

    loading       a hub id, a folder, a GGUF file or the built-in tiny GPT-2, with its tokenizer
    gguf          a model from a GGUF file (llama.cpp's format), dequantized
    known         the real model `python -m bitfit.fetch` gets, and the hint that names it
    tiny          building tiny GPT-2s and tokenizers (the tests, the built-in model's assets)
    bias_names    where each group of biases lives in each model family
    bias_terms    --bias-terms: which biases train, slices of fused biases held still by gradient masks
    added_biases  --add-biases: zero biases for a model that has none
    fingerprint   a short hash of a base's frozen weights, so deltas and checkpoints meet their own base
    compute       the weights' dtype, fp32 norms, fused GELU, eager attention on CPU, fp16's loss scaling
    label_loss    the loss a run computes: the head only at label positions (the same number as core's)
    quantize      --quantize nf4: the frozen weights of the blocks held in 4 bits (torchao)
    generation    answering prompts in the template the model was trained with

May import: the standard library, torch, transformers, tokenizers, safetensors, torchao, jinja2;
bitfit.errors, bitfit.config, bitfit.core, bitfit.data
"""
