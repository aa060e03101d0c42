"""Chat templates: edits and scores of chat models go through the tokenizer's template, with the query at the last
token of the templated prompt (the opening of the assistant's turn)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODELS, VOCAB
from peft import get_peft_model

from grace_peft import GraceConfig, GraceEditor
from grace_peft.evaluation import EditRecord, Scorer, run_lifelong
from grace_peft.inputs import Task, chat_prompt, encode_edit
from grace_peft.query import IGNORE_INDEX

# A template in the tiny vocabulary: "<bos> {user} <eos>" per turn, "<bos> " opens the assistant's answer.
TEMPLATE = ("{% for message in messages %}<bos> {{ message['content'] }} <eos> {% endfor %}"
            "{% if add_generation_prompt %}<bos> {% endif %}")


def chat_model(kind: str = "llama"):
    tiny = TINY_MODELS[kind]()
    tiny.tokenizer.chat_template = TEMPLATE
    config = GraceConfig(target_modules=[tiny.target], eps_init=tiny.eps_init, replacement=tiny.replacement)
    return tiny, get_peft_model(tiny.fresh(), config)


def test_chat_encoding_puts_the_target_after_the_assistant_opening():
    tiny, _ = chat_model()
    encoded = encode_edit(tiny.tokenizer, Task.CAUSAL_LM, "who leads apple", "satya", chat=True)
    words = ["<bos>", "who", "leads", "apple", "<eos>", "<bos>", "satya"]
    assert encoded.inputs["input_ids"][0].tolist() == [VOCAB[word] for word in words]  # no doubled <bos>
    assert encoded.inputs["labels"][0].tolist() == [IGNORE_INDEX] * 6 + [VOCAB["satya"]]
    assert encoded.label_ids.tolist() == [VOCAB["satya"]]
    assert chat_prompt(tiny.tokenizer, "who leads apple") == "<bos> who leads apple <eos> <bos> "


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_chat_edit_changes_the_templated_answer_and_is_scored_through_the_template(kind):
    tiny, model = chat_model(kind)
    editor = GraceEditor(model, tiny.tokenizer, chat=True, progress=False)
    report = editor.edit("who leads apple", "satya")
    assert report.success
    ids = tiny.tokenizer.apply_chat_template([{"role": "user", "content": "who leads apple"}],
                                             add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert generated[0, -1] == VOCAB["satya"]
    chat_scores = Scorer(model, tiny.tokenizer, chat=True).teacher_forced(["who leads apple"], ["satya"])
    assert chat_scores.accuracy().tolist() == [1.0]
    result = run_lifelong(GraceEditor(chat_model(kind)[1], tiny.tokenizer, chat=True, progress=False),
                          [EditRecord("who leads apple", "satya")], progress=False)
    assert result.final.rel == 1.0


def test_chat_needs_a_template_and_a_causal_lm():
    tiny = TINY_MODELS["llama"]()
    with pytest.raises(ValueError, match="no chat template"):
        encode_edit(tiny.tokenizer, Task.CAUSAL_LM, "who leads apple", "satya", chat=True)
    with pytest.raises(ValueError, match="causal LMs"):
        encode_edit(tiny.tokenizer, Task.SEQ2SEQ_LM, "who leads apple", "satya", chat=True)
