"""Edit a tiny GPT-2 end to end, offline: wrap, edit, save, reload in a fresh model, compare.

Runs in seconds on a CPU with no downloads (the model and tokenizer are built in code), so it doubles as a smoke
test of the whole PEFT round trip. Run: python examples/edit_tiny_gpt2.py [output_dir]
"""

import sys
import tempfile

import torch
from peft import PeftModel, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import grace_peft  # noqa: F401  (registers GRACE with peft: needed before PeftModel.from_pretrained)
from grace_peft import GraceConfig, GraceEditor

WORDS = "<pad> the capital of australia france is canberra paris sydney ceo apple leads tim cook satya who".split()


def build_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")


def build_base() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(WORDS), n_embd=64, n_layer=2, n_head=2, n_positions=32, pad_token_id=0,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def next_word(model, tokenizer, prompt: str) -> str:
    with torch.no_grad():
        logits = model(**tokenizer(prompt, return_tensors="pt")).logits
    return tokenizer.decode(logits[0, -1].argmax())


def main(output_dir: str) -> None:
    tokenizer = build_tokenizer()
    model = get_peft_model(build_base(), GraceConfig(target_modules=["h.1.mlp.c_proj"], eps_init=0.5))
    edits = [("the capital of australia is", "canberra"), ("the ceo of apple is", "tim")]
    before = {prompt: next_word(model, tokenizer, prompt) for prompt, _ in edits}

    reports = GraceEditor(model, tokenizer, progress=False).edit_many(edits)
    for report in reports:
        print(f"{report.prompt!r} -> {report.target!r}: {report.operation.value}, {report.steps} steps, "
              f"taken={report.success}")

    model.save_pretrained(output_dir)
    reloaded = PeftModel.from_pretrained(build_base(), output_dir)
    print(f"{'prompt':32} {'before':10} {'after':10} {'reloaded':10}")
    for prompt, _ in edits:
        after, again = next_word(model, tokenizer, prompt), next_word(reloaded, tokenizer, prompt)
        print(f"{prompt:32} {before[prompt]:10} {after:10} {again:10}")
    unrelated = "who leads apple"
    with model.disable_adapter():
        base_logits = model(**tokenizer(unrelated, return_tensors="pt")).logits
    same = torch.equal(base_logits, reloaded(**tokenizer(unrelated, return_tensors="pt")).logits)
    print(f"unrelated prompt {unrelated!r} unchanged bit for bit: {same}")
    if not all(report.success for report in reports) or not same:
        raise SystemExit("an edit did not take or locality broke")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="grace-edits-"))
