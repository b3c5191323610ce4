"""Data: rows from a file or a hub dataset, their formats, the prompt templates, and rows made into examples.

    rows       reading rows (local files streamed, hub datasets), holding some out, their fingerprint
    formats    the four data formats (alpaca, prompt-completion, messages, ShareGPT), told by their columns
    templates  the two prompt formats: human-assistant (the seed notebook's) and the tokenizer's chat template
    tokenize   rows -> examples (lazily), labels masked over the prompt; why a row is dropped
    prompts    prompts to answer, read from a file (generate.py --prompts)

May import: the standard library, torch, datasets, jinja2; bitfit.errors, bitfit.config, bitfit.core
"""
