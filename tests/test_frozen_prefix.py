"""Replaying the frozen blocks below the edited layer (``grace_peft.frozen_prefix``, spec §3).

``blocks_below`` finds the blocks under the lowest edited layer; ``replay_frozen_blocks`` records their output on
the first pass of an edit and replays it on later ones. Editing with and without the replay must give bit-identical
codebooks, the replay must really skip the blocks' computation, and every block must be itself again afterwards.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BOS, EOS, PAD, TINY_MODELS, WORDS, codebook_of, make_tokenizer
from peft import get_peft_model
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from grace_peft import CodebookOperation, GraceConfig, GraceEditor
from grace_peft.frozen_prefix import blocks_below, replay_frozen_blocks


# ---------------------------------------------------------------------------------------------- tiny 3-layer models
def gpt2_3() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=3, n_head=2, n_positions=64,
                        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    return GPT2LMHeadModel(config).eval()


def llama_3() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    return LlamaForCausalLM(config).eval()


def t5_3() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(WORDS), d_model=32, d_ff=64, num_layers=3, num_heads=2, d_kv=16,
                      decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS)
    return T5ForConditionalGeneration(config).eval()


# kind -> (build, tokenizer template, target at the top layer, replacement, eps_init matched to its queries:
# "the capital of australia is" vs "... france is" at 0.04 / 0.011 / 2.16, other prompts 0.6+ / 0.06+ / 5+)
THREE_LAYER = {
    "gpt2": (gpt2_3, None, "transformer.h.2.mlp.c_proj", "replace_last", 0.2),
    "llama": (llama_3, "bos", "model.layers.2.mlp.down_proj", "replace_last", 0.02),
    "t5": (t5_3, None, "encoder.block.2.layer.1.DenseReluDense.wo", "replace_all", 1.5),
}
# ADD, then a same-label neighbour (EXPAND), a conflicting neighbour (SPLIT), a far prompt (ADD), a new target for
# an edited prompt (OVERWRITE)
EDITS = (
    ("the capital of australia is", "canberra"),
    ("the capital of france is", "canberra"),
    ("the capital of france is", "paris"),
    ("who leads apple", "madrid"),
    ("the capital of australia is", "rome"),
)
NEW_PROMPT = "satya lives in a city"


def wrapped(kind: str, **overrides):
    build, template, target, replacement, eps_init = THREE_LAYER[kind]
    config = dict(target_modules=[target], replacement=replacement, eps_init=eps_init)
    config.update(overrides)
    return get_peft_model(build(), GraceConfig(**config)), make_tokenizer(template)


def codebook_tensors(model) -> dict[str, torch.Tensor]:
    """The codebook's entries (not its journal, which records when each edit ran and how long it took)."""
    return {name: tensor.detach().clone() for name, tensor in codebook_of(model).state_dict().items()
            if not name.startswith("journal_")}


def inputs_for(tokenizer, prompt: str, seq2seq: bool = False) -> dict[str, torch.Tensor]:
    inputs = dict(tokenizer(prompt, return_tensors="pt"))
    if seq2seq:
        inputs["decoder_input_ids"] = torch.tensor([[PAD]])
    return inputs


def block_list(model, kind: str) -> torch.nn.ModuleList:
    """The transformer blocks of a (base) model of ``kind``."""
    if kind == "gpt2":
        return model.transformer.h
    return model.model.layers if kind == "llama" else model.encoder.block


class CallCounter:
    """Wraps a block's forward as an instance attribute and counts the calls that reach it."""

    def __init__(self, block: torch.nn.Module) -> None:
        self.calls = 0
        self.original = block.forward

        def counting_forward(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)

        self.forward = counting_forward
        block.forward = counting_forward


# =================================================================================================== blocks_below
def test_blocks_below_gpt2():
    model = TINY_MODELS["gpt2"]().fresh()
    blocks = blocks_below(model, ["transformer.h.1.mlp.c_proj"])
    assert len(blocks) == 1 and blocks[0] is model.transformer.h[0]


def test_blocks_below_gpt2_three_layers():
    model = gpt2_3()
    blocks = blocks_below(model, ["transformer.h.2.mlp.c_proj"])
    assert len(blocks) == 2
    assert blocks[0] is model.transformer.h[0] and blocks[1] is model.transformer.h[1]
    assert blocks_below(model, ["transformer.h.0.mlp.c_proj"]) == []


def test_blocks_below_llama():
    model = TINY_MODELS["llama"]().fresh()
    blocks = blocks_below(model, ["model.layers.1.mlp.down_proj"])
    assert len(blocks) == 1 and blocks[0] is model.model.layers[0]


def test_blocks_below_the_lowest_of_several_targets():
    model = TINY_MODELS["gpt2"]().fresh()
    assert blocks_below(model, ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]) == []
    assert blocks_below(model, ["transformer.h.1.mlp.c_proj", "transformer.h.0.mlp.c_proj"]) == []
    model3 = gpt2_3()
    blocks = blocks_below(model3, ["transformer.h.2.mlp.c_proj", "transformer.h.1.attn.c_attn"])
    assert len(blocks) == 1 and blocks[0] is model3.transformer.h[0]


def test_blocks_below_a_name_outside_any_module_list():
    model = TINY_MODELS["gpt2"]().fresh()
    assert blocks_below(model, ["lm_head"]) == []
    assert blocks_below(model, ["transformer.wte"]) == []
    # one target outside the list: nothing below all of them can be replayed
    assert blocks_below(model, ["transformer.h.1.mlp.c_proj", "lm_head"]) == []
    assert blocks_below(model, []) == []


def test_blocks_below_t5_encoder_target():
    model = TINY_MODELS["t5"]().fresh()
    blocks = blocks_below(model, ["encoder.block.1.layer.1.DenseReluDense.wo"])
    assert len(blocks) == 1 and blocks[0] is model.encoder.block[0]
    model3 = t5_3()
    blocks = blocks_below(model3, ["encoder.block.2.layer.1.DenseReluDense.wo"])
    assert len(blocks) == 2
    assert blocks[0] is model3.encoder.block[0] and blocks[1] is model3.encoder.block[1]


@pytest.mark.parametrize("kind", list(THREE_LAYER))
def test_editor_finds_the_blocks_below_its_layer(kind):
    model, tokenizer = wrapped(kind)
    base = model.get_base_model()
    expected = block_list(base, kind)[:2]
    editor = GraceEditor(model, tokenizer, progress=False)
    assert len(editor.frozen_blocks) == 2
    assert all(got is want for got, want in zip(editor.frozen_blocks, expected, strict=True))
    assert GraceEditor(model, tokenizer, progress=False, reuse_frozen_layers=False).frozen_blocks == []


# ============================================================================================== bit-identical edits
@pytest.mark.parametrize(("kind", "early_stop"), [("gpt2", "never"), ("llama", "never"), ("t5", "never"),
                                                  ("llama", "predicted")])
def test_reuse_gives_bit_identical_codebooks(kind, early_stop):
    max_steps = 3
    results = {}
    for reuse in (True, False):
        model, tokenizer = wrapped(kind, early_stop=early_stop, max_steps=max_steps)
        editor = GraceEditor(model, tokenizer, progress=False, reuse_frozen_layers=reuse)
        assert bool(editor.frozen_blocks) is reuse
        reports = [editor.edit(prompt, target) for prompt, target in EDITS]
        results[reuse] = (codebook_tensors(model), reports, model, tokenizer)

    (on, on_reports, on_model, tokenizer), (off, off_reports, off_model, _) = results[True], results[False]
    if early_stop == "never":  # every edit trains max_steps steps on replayed activations
        assert [report.steps for report in on_reports] == [max_steps] * len(EDITS)
    else:
        assert sum(report.steps for report in on_reports) >= 2, "setup: the edits must train"
    operations = {report.operation for report in on_reports}
    assert operations == set(CodebookOperation), f"setup: only {operations}"
    assert [r.operation for r in on_reports] == [r.operation for r in off_reports]
    assert [r.steps for r in on_reports] == [r.steps for r in off_reports]
    assert [r.loss for r in on_reports] == [r.loss for r in off_reports]
    assert [r.success for r in on_reports] == [r.success for r in off_reports]
    for name in ("keys", "values", "radii"):
        assert on[name].shape[0] >= 3
        assert torch.equal(on[name], off[name]), name
    assert on.keys() == off.keys()
    assert all(torch.equal(on[name], off[name]) for name in on)
    # and the two edited models answer identically
    with torch.no_grad():
        for prompt in (*{p for p, _ in EDITS}, NEW_PROMPT):
            inputs = inputs_for(tokenizer, prompt, seq2seq=kind == "t5")
            assert torch.equal(on_model(**inputs).logits, off_model(**inputs).logits), prompt


# ============================================================================================== computation skipped
@pytest.mark.parametrize(("early_stop", "max_steps"), [("never", 5), ("predicted", 20)])
def test_replay_skips_the_blocks_computation(early_stop, max_steps):
    counts, steps = {}, {}
    for reuse in (True, False):
        model, tokenizer = wrapped("gpt2", early_stop=early_stop, max_steps=max_steps)
        editor = GraceEditor(model, tokenizer, progress=False, reuse_frozen_layers=reuse)
        counter = CallCounter(model.get_base_model().transformer.h[0])
        report = editor.edit("the capital of australia is", "canberra")
        assert not report.skipped
        counts[reuse], steps[reuse] = counter.calls, report.steps
        # the counting forward is back in place after the edit, and no hook is left behind
        block = model.get_base_model().transformer.h[0]
        assert block.__dict__["forward"] is counter.forward
        assert all(not b._forward_hooks for b in model.get_base_model().transformer.h)

    assert steps[True] == steps[False] >= 1
    s = steps[True]
    # training runs one forward per optimizer step, plus the forward that found the target predicted (if any)
    training_forwards = min(s + 1, max_steps)
    if early_stop == "never":
        assert s == max_steps and training_forwards == max_steps
    else:
        assert s < max_steps
    # the probe (recorded, then replayed in every training step), and a verify pass unless the forward that stopped
    # the training already showed the target predicted with the final value
    verify = 1 if early_stop == "never" else 0
    assert counts[True] == 1 + verify
    assert counts[False] == 1 + training_forwards + verify  # probe + every training step (+ verify)


def test_replay_inside_the_context_returns_the_recorded_output_without_computing():
    model = gpt2_3()
    tokenizer = make_tokenizer()
    inputs = inputs_for(tokenizer, "the capital of australia is")
    blocks = list(model.transformer.h[:2])
    counters = [CallCounter(block) for block in blocks]
    with torch.no_grad(), replay_frozen_blocks(blocks):
        first = model(**inputs).logits
        second = model(**inputs).logits
        third = model(**inputs).logits
    assert [counter.calls for counter in counters] == [1, 1]
    assert torch.equal(first, second) and torch.equal(first, third)


# ============================================================================================== restored afterwards
def assert_like_a_fresh_model(model, build, tokenizer, seq2seq: bool = False) -> None:
    fresh = build()
    inputs = inputs_for(tokenizer, NEW_PROMPT, seq2seq=seq2seq)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, fresh(**inputs).logits)


@pytest.mark.parametrize("kind", list(THREE_LAYER))
def test_blocks_are_restored_after_the_context(kind):
    build = THREE_LAYER[kind][0]
    tokenizer = make_tokenizer(THREE_LAYER[kind][1])
    model = build()
    blocks = list(block_list(model, kind)[:2])
    with torch.no_grad(), replay_frozen_blocks(blocks):
        model(**inputs_for(tokenizer, "the capital of australia is", seq2seq=kind == "t5"))
        model(**inputs_for(tokenizer, "the capital of australia is", seq2seq=kind == "t5"))
    assert all("forward" not in block.__dict__ and not block._forward_hooks for block in blocks)
    assert_like_a_fresh_model(model, build, tokenizer, seq2seq=kind == "t5")


@pytest.mark.parametrize("passes", [0, 1, 2])
def test_blocks_are_restored_when_the_context_raises(passes):
    model, tokenizer = gpt2_3(), make_tokenizer()
    blocks = list(model.transformer.h[:2])
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), replay_frozen_blocks(blocks):
        for _ in range(passes):
            model(**inputs_for(tokenizer, "the capital of australia is"))
        raise RuntimeError("boom")
    assert all("forward" not in block.__dict__ and not block._forward_hooks for block in blocks)
    assert_like_a_fresh_model(model, gpt2_3, tokenizer)


def test_a_forward_set_on_the_instance_before_the_context_is_put_back():
    model, tokenizer = gpt2_3(), make_tokenizer()
    block = model.transformer.h[0]
    counter = CallCounter(block)
    with torch.no_grad(), replay_frozen_blocks([block]):
        model(**inputs_for(tokenizer, "the capital of australia is"))
        model(**inputs_for(tokenizer, "the capital of australia is"))
    assert block.__dict__["forward"] is counter.forward
    assert counter.calls == 1
    assert_like_a_fresh_model(model, gpt2_3, tokenizer)
    assert counter.calls == 2


def test_blocks_are_restored_when_an_edit_raises_mid_training():
    model, tokenizer = wrapped("gpt2")
    editor = GraceEditor(model, tokenizer, progress=False)
    blocks = editor.frozen_blocks
    assert len(blocks) == 2

    def failing_check(*args):
        assert all("forward" in block.__dict__ for block in blocks)  # the first training forward switched to replay
        raise RuntimeError("boom")

    editor._done = failing_check
    with pytest.raises(RuntimeError, match="boom"):
        editor.edit("the capital of australia is", "canberra")
    assert all("forward" not in block.__dict__ and not block._forward_hooks for block in blocks)
    assert editor.num_keys() == 0
    assert_like_a_fresh_model(model, gpt2_3, tokenizer)
    # and the editor still works: a later edit takes
    del editor._done
    assert editor.edit("the capital of australia is", "canberra").success
