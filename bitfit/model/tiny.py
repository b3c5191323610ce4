"""Building tiny models: a GPT-2-style tokenizer and config, for the tests and bitfit/assets/build_tiny_gpt2.py."""


def train_tokenizer(texts, vocab_size: int, eos_token: str = "<|endoftext|>"):
    """Train a small byte-level BPE tokenizer in the style of GPT-2 (eos, no pad token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos_token],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos_token,
                                   bos_token=eos_token, unk_token=eos_token)


def tiny_gpt2_config(tokenizer, **overrides):
    from transformers import GPT2Config

    settings = dict(vocab_size=len(tokenizer), n_positions=512, n_embd=256, n_layer=4, n_head=4,
                    bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    settings.update(overrides)
    return GPT2Config(**settings)
