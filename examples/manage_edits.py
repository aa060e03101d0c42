"""Living with edits, offline on a tiny GPT-2: gate edits by subject, list them, see which one fires, take one back.

Runs in seconds on a CPU with no downloads (the model and tokenizer are built in code). The same operations exist as
commands on saved adapters: grace-peft list / trace / remove / merge. Run: python examples/manage_edits.py [output_dir]
"""

import sys
import tempfile

from edit_tiny_gpt2 import build_base, build_tokenizer, next_word  # the tiny model of the first example
from peft import PeftModel, get_peft_model

import grace_peft  # noqa: F401  (registers GRACE with peft: needed before PeftModel.from_pretrained)
from grace_peft import GraceConfig, GraceEditor


def main(output_dir: str) -> None:
    tokenizer = build_tokenizer()
    # A large radius, so that every prompt of this tiny vocabulary lies in the edit's ball: only the subject gate
    # keeps the same question about another subject unchanged. journal_text keeps the prompts in the journal.
    config = GraceConfig(target_modules=["h.1.mlp.c_proj"], eps_init=50.0, subject_gate=True, journal_text=True)
    model = get_peft_model(build_base(), config)
    editor = GraceEditor(model, tokenizer, progress=False)
    other_subject = "the capital of france is"
    before = next_word(model, tokenizer, other_subject)

    editor.edit("the capital of australia is", "canberra", subject="australia")
    editor.edit("who leads apple", "satya", subject="apple")
    for edit in editor.history():
        print(f"edit {edit.edit_id}: {edit.prompt!r} -> {edit.target_text!r}, {edit.operations}, took={edit.success}")

    print(editor.explain("the capital of australia is").summary())
    print(editor.explain(other_subject).summary())
    unchanged = next_word(model, tokenizer, other_subject) == before
    print(f"{other_subject!r} unchanged: {unchanged}")

    removal = editor.remove(1)
    print(removal.summary())
    model.save_pretrained(output_dir)  # with the journal and the GRACE model card
    reloaded = PeftModel.from_pretrained(build_base(), output_dir)
    answers = [next_word(reloaded, tokenizer, prompt) for prompt in ("the capital of australia is", "who leads apple")]
    print(f"reloaded from {output_dir}: {answers}")
    if not unchanged or answers[0] != "canberra" or answers[1] == "satya" or not removal.complete:
        raise SystemExit("the gate, the undo or the reload did not behave as described")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="grace-edits-"))
