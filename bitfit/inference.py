"""Answering prompts with a (possibly bias-tuned) model, in the training template."""

import torch

from bitfit.data import format_prompt


@torch.no_grad()
def generate_answers(model, tokenizer, instructions: list[tuple[str, str]], *, max_new_tokens: int,
                     temperature: float = 0.0, batch_size: int = 8) -> list[str]:
    """Answer (instruction, input) pairs; greedy when temperature is 0."""
    model.eval()
    device = next(model.parameters()).device
    # A decoder-only model continues from the last position, so batches are padded on the left.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # GPT-2 has none; the attention mask hides the padding
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [format_prompt(instruction, input) for instruction, input in instructions]
    answers = []
    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
        encoded = {key: value.to(device) for key, value in encoded.items()}
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        output = model.generate(**encoded, max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id, **sampling)
        new_tokens = output[:, encoded["input_ids"].size(1):]
        answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [answer.strip() for answer in answers]
