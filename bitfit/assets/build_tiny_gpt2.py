"""Rebuild the built-in tiny GPT-2's config and tokenizer (run once; the results are committed).

    python -m bitfit.assets.build_tiny_gpt2

The tokenizer is a byte-level BPE, like GPT-2's, trained on the sample data that ships beside
it; the model is 4 layers of width 256. Its weights are not stored: bitfit draws them from a
fixed seed at load time (see bitfit.model), which keeps the repository small.
"""

import json

from bitfit.config import ASSETS, DEFAULT_DATA
from bitfit.data.templates import format_prompt
from bitfit.model.loading import TINY_GPT2_DIR
from bitfit.model.tiny import tiny_gpt2_config, train_tokenizer


def main():
    rows = json.loads(open(DEFAULT_DATA).read())
    texts = [format_prompt(row["instruction"], row["input"]) + row["output"] for row in rows]
    tokenizer = train_tokenizer(texts, vocab_size=2048)
    tokenizer.model_max_length = 512
    config = tiny_gpt2_config(tokenizer, n_positions=512)
    TINY_GPT2_DIR.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(TINY_GPT2_DIR)
    config.save_pretrained(TINY_GPT2_DIR)
    print(f"wrote {TINY_GPT2_DIR.relative_to(ASSETS.parent.parent)}: vocab {len(tokenizer)}")


if __name__ == "__main__":
    main()
