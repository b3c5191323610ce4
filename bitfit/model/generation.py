"""Answering prompts with a (possibly bias-tuned) model, in the prompt format it was trained with.

A prompt is a conversation ending in a user turn ([{"role", "content"}, ...]), or an
(instruction, input) pair, which is one user turn. It is tokenized as training tokenized the
text before each answer (bitfit.data.templates.prompt_ids): through the human-assistant template
or the chat template.
"""

import torch

from bitfit.data.templates import end_of_turn_ids, prompt_ids
from bitfit.errors import InputError
from bitfit.model.loading import pad_token_id


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list, *, max_new_tokens: int, temperature: float = 0.0,
                     batch_size: int = 8, template: str = "human-assistant") -> list[str]:
    """Answer prompts (conversations, or (instruction, input) pairs); greedy when temperature is 0."""
    model.eval()
    device = next(model.parameters()).device
    stop = {"eos_token_id": stop_ids(model, tokenizer)} if template == "chat" else {}
    answers = []
    for start in range(0, len(prompts), batch_size):
        ids = [prompt_ids(tokenizer, as_conversation(prompt), template) for prompt in prompts[start:start + batch_size]]
        # A decoder-only model continues from the last position, so batches are padded on the left;
        # the attention mask hides the padding.
        width = max(len(prompt) for prompt in ids)
        input_ids = torch.tensor([[pad_token_id(tokenizer)] * (width - len(prompt)) + prompt for prompt in ids])
        attention_mask = torch.tensor([[0] * (width - len(prompt)) + [1] * len(prompt) for prompt in ids])
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                max_new_tokens=max_new_tokens, pad_token_id=pad_token_id(tokenizer), **stop,
                                **sampling)
        answers += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return [answer.strip() for answer in answers]


def stop_ids(model, tokenizer) -> list[int]:
    """Under the chat template, an answer ends at the template's end-of-turn marker, which a model's
    generation config does not always list among its eos tokens."""
    configured = model.generation_config.eos_token_id
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return sorted(set(configured) | set(end_of_turn_ids(tokenizer)))


def as_conversation(prompt) -> list[dict]:
    """A prompt as a conversation: an (instruction, input) pair is one user turn, joined as the
    human-assistant template joins them."""
    if isinstance(prompt, tuple):
        instruction, input = prompt
        return [{"role": "user", "content": "\n".join([instruction, input]).strip()}]
    return prompt


def show_prompt(prompt) -> str:
    """A prompt as generate.py prints it: a lone user turn's text, else one "role: text" line per turn."""
    conversation = as_conversation(prompt)
    if len(conversation) == 1:
        return conversation[0]["content"]
    return "\n".join(f"{message['role']}: {message['content']}" for message in conversation)


def room_for_answers(tokenizer, prompts: list, limit: int, model_name: str, template: str = "human-assistant") -> int:
    """How many new tokens fit after the longest prompt in the model's limit of positions.

    A prompt that leaves no room for an answer is refused: past its position table, a model
    such as GPT-2 fails with an IndexError deep inside generation.
    """
    lengths = [len(prompt_ids(tokenizer, as_conversation(prompt), template)) for prompt in prompts]
    longest = max(lengths)
    if longest >= limit:
        raise InputError(f"prompt {lengths.index(longest) + 1} is {longest} tokens in the template, and "
                         f"{model_name} reads at most {limit}: no room is left for an answer; shorten it")
    return limit - longest
