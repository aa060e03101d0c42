"""Text the model writes itself from generic openings: unrelated to any edit, so it can measure a key space
(:mod:`grace_peft.calibration`) and give values contexts to be trained under (``GraceConfig.value_contexts``)
without touching evaluation data."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from tqdm.auto import tqdm

from .inputs import input_device, pad_token_id

OPENINGS = ("The", "In", "A", "My", "Today", "When", "Why", "How", "What", "Who", "Where", "It", "There", "After",
            "Many", "This", "Our", "If", "Some", "One", "Yesterday", "Please", "Can", "Every", "She", "He", "They",
            "We", "Most", "Once")


def background_texts(model: nn.Module, tokenizer, count: int = 256, *, seed: int = 0, max_new_tokens: int = 24,
                     batch_size: int = 32, progress: bool = True) -> list[str]:
    """``count`` texts the model writes itself (sampled from generic openings, seeded; adapters switched off)."""
    texts: list[str] = []
    openings = [OPENINGS[index % len(OPENINGS)] for index in range(count)]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        with torch.random.fork_rng(), adapters_off(model), torch.no_grad():  # the caller's RNG is left alone
            torch.manual_seed(seed)
            for start in tqdm(range(0, count, batch_size), desc="background text", disable=not progress):
                batch = tokenizer(openings[start:start + batch_size], return_tensors="pt", padding=True)
                batch = {name: tensor.to(input_device(model)) for name, tensor in batch.items()}
                generated = model.generate(**batch, do_sample=True, top_p=0.95, max_new_tokens=max_new_tokens,
                                           pad_token_id=pad_token_id(tokenizer))
                texts += tokenizer.batch_decode(generated, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
    return [text.strip() for text in texts if text.strip()]


def adapters_off(model: nn.Module) -> AbstractContextManager:
    """A PeftModel's ``disable_adapter()`` (the base model alone); a no-op for other models."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else nullcontext()
