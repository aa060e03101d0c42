"""Bad input and damaged files: a table of corruptions of a saved codebook, each refused on load with one error
that names the module and the tensor; refused injections that wrap nothing; adapter names that are not names."""

from __future__ import annotations

import pytest
import torch
from conftest import NEAR_PROMPTS, TINY_MODELS, apply_edits, batch_logits, codebook_of, target_for, wrap
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from grace_peft import CodebookContentError, EditsPartlyApplied, GraceConfig, GraceEditor, GraceLayer

WEIGHTS = "adapter_model.safetensors"


def _key(tensors: dict[str, torch.Tensor], name: str) -> str:
    (key,) = [key for key in tensors if key.endswith(f".grace_codebook.{name}")]
    return key


def _set(name: str, change):
    """A corruption: replace tensor ``name`` by ``change(tensor)``."""
    def corrupt(tensors):
        tensors[_key(tensors, name)] = change(tensors[_key(tensors, name)].clone())
    return corrupt


def _first(value):
    def change(tensor):
        tensor.view(-1)[0] = value
        return tensor
    return change


CORRUPTIONS = {
    "nan-key": (_set("keys", _first(float("nan"))), "'keys' holds NaN or infinite"),
    "inf-value": (_set("values", _first(float("inf"))), "'values' holds NaN or infinite"),
    "negative-radius": (_set("radii", _first(-1.0)), "'radii' holds negative radii"),
    "nan-radius": (_set("radii", _first(float("nan"))), "'radii' holds NaN or infinite"),
    "float-labels": (_set("label_tokens", lambda tensor: tensor.float()), "'label_tokens' has dtype torch.float32"),
    "float-edit-ids": (_set("edit_ids", lambda tensor: tensor.double()), "'edit_ids' has dtype torch.float64"),
    "integer-keys": (_set("keys", lambda tensor: tensor.long()), "'keys' has dtype torch.int64"),
    "lengths-do-not-add-up": (_set("label_lengths", lambda tensor: tensor + 1), "'label_lengths' add up to"),
    "empty-label": (_set("label_lengths", _first(0)), "an entry without label tokens"),
    "duplicate-edit-ids": (_set("edit_ids", torch.zeros_like), "repeat an id"),
    "negative-edit-id": (_set("edit_ids", _first(-3)), "negative id"),
    "edit-id-past-next": (_set("next_edit_id", torch.zeros_like), "not below its 'next_edit_id'"),
    "rows-disagree": (_set("radii", lambda tensor: tensor[:1]), "disagree on the number of entries"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tm = TINY_MODELS["gpt2"]()
    model = wrap(tm)
    apply_edits(model, tm, [(NEAR_PROMPTS[0], target_for("gpt2")), ("who leads apple", "paris")])
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    return tm, model, folder


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_codebook_is_refused_naming_module_and_tensor(saved, tmp_path, corruption, low_cpu_mem_usage):
    tm, _, folder = saved
    corrupt, message = CORRUPTIONS[corruption]
    tensors = load_file(folder / WEIGHTS)
    corrupt(tensors)
    (tmp_path / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
    save_file(tensors, tmp_path / WEIGHTS)
    base = tm.fresh()
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    with pytest.raises(CodebookContentError, match=r"'base_model\.model\.transformer\.h\.1\.mlp\.c_proj' is corrupt"
                                                   r".*" + message.replace("(", r"\(").replace(")", r"\)")):
        PeftModel.from_pretrained(base, tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert_base_as_before(base, before)


def assert_base_as_before(base, before: dict[str, torch.Tensor]) -> None:
    """No GRACE layer, hook or generate wrapper is left, and every weight is what it was."""
    assert not any(isinstance(module, GraceLayer) for module in base.modules())
    assert not base._forward_pre_hooks and not base._forward_hooks and "generate" not in base.__dict__
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)


def corrupt_copy(folder, tmp_path, corruption: str = "nan-key"):
    tensors = load_file(folder / WEIGHTS)
    CORRUPTIONS[corruption][0](tensors)
    (tmp_path / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
    save_file(tensors, tmp_path / WEIGHTS)
    return tmp_path


def test_transformers_load_adapter_refuses_a_corrupt_codebook_and_leaves_the_model_as_it_was(saved, tmp_path):
    tm, model, folder = saved
    corrupt = corrupt_copy(folder, tmp_path)
    base = tm.fresh()
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    with pytest.raises(CodebookContentError, match=r"'transformer\.h\.1\.mlp\.c_proj' is corrupt: its 'keys'"):
        base.load_adapter(str(corrupt))
    assert_base_as_before(base, before)
    assert not hasattr(base, "peft_config")
    base.load_adapter(str(folder))  # and a good adapter loads afterwards
    assert torch.equal(batch_logits(base, tm), batch_logits(model, tm))
    outputs = batch_logits(base, tm)
    with pytest.raises(CodebookContentError):
        base.load_adapter(str(corrupt), adapter_name="other")
    assert list(base.peft_config) == ["default"]
    assert torch.equal(batch_logits(base, tm), outputs)


def test_a_corrupt_adapter_loaded_beside_a_live_one_leaves_no_trace(saved, tmp_path):
    tm, model, folder = saved
    corrupt_copy(folder, tmp_path)
    live = PeftModel.from_pretrained(tm.fresh(), folder)
    outputs = batch_logits(live, tm)
    with pytest.raises(CodebookContentError, match="'keys' holds NaN"):
        live.load_adapter(tmp_path, adapter_name="other")
    assert list(live.peft_config) == ["default"] and live.active_adapter == "default"
    assert all(list(module.grace_codebook) == ["default"] for module in live.modules()
               if isinstance(module, GraceLayer))
    assert torch.equal(batch_logits(live, tm), outputs)
    live.load_adapter(folder, adapter_name="other")  # a good adapter still loads under that name
    assert "other" in live.peft_config


@pytest.mark.parametrize(("change", "message"), [
    (lambda tensors: {**tensors, **{key.replace("h.1.", "h.0."): value.clone() for key, value in tensors.items()}},
     r"codebooks for modules this adapter does not wrap \(base_model\.model\.transformer\.h\.0\.mlp\.c_proj\)"),
    (lambda tensors: {"unrelated": torch.zeros(1)}, r"no codebook for wrapped module\(s\) .*h\.1\.mlp\.c_proj"),
], ids=["tensors-for-an-unwrapped-module", "no-codebook-for-a-wrapped-module"])
def test_weights_that_do_not_match_the_config_are_refused(saved, tmp_path, change, message):
    tm, _, folder = saved
    (tmp_path / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
    save_file(change(load_file(folder / WEIGHTS)), tmp_path / WEIGHTS)
    base = tm.fresh()
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    with pytest.raises(CodebookContentError, match=message):
        PeftModel.from_pretrained(base, tmp_path)
    assert_base_as_before(base, before)


def test_saved_dtypes_are_made_float32_and_int64_on_every_loader(saved, tmp_path):
    """A file written with float64 keys and int32 ids (by another tool) loads into the codebook's own dtypes."""
    tm, model, folder = saved
    tensors = load_file(folder / WEIGHTS)
    for key, tensor in list(tensors.items()):
        tensors[key] = tensor.double() if tensor.is_floating_point() else tensor.int()
    (tmp_path / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
    save_file(tensors, tmp_path / WEIGHTS)
    for low_cpu_mem_usage in (False, True):
        again = PeftModel.from_pretrained(tm.fresh(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        book = codebook_of(again)
        assert {book.keys.dtype, book.values.dtype, book.radii.dtype} == {torch.float32}
        assert {book.label_tokens.dtype, book.edit_ids.dtype, book.next_edit_id.dtype} == {torch.int64}
        assert torch.equal(batch_logits(again, tm), batch_logits(model, tm))


def test_a_refused_injection_wraps_nothing():
    """One target GRACE cannot wrap (a LayerNorm) next to one it can: the model is left without any GRACE layer."""
    tm = TINY_MODELS["gpt2"]()
    base = tm.fresh()
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    with pytest.raises(TypeError, match="'transformer.ln_f' is a LayerNorm"):
        get_peft_model(base, GraceConfig(target_modules=["h.1.mlp.c_proj", "transformer.ln_f"]))
    assert not any(isinstance(module, GraceLayer) for module in base.modules())
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)


def test_an_encoder_and_a_decoder_target_of_t5_wrap_nothing():
    tm = TINY_MODELS["t5"]()
    base = tm.fresh()
    with pytest.raises(NotImplementedError, match="decoder of an encoder-decoder"):
        get_peft_model(base, GraceConfig(target_modules=[tm.target, "decoder.block.1.layer.2.DenseReluDense.wo"]))
    assert not any(isinstance(module, GraceLayer) for module in base.modules())


@pytest.mark.parametrize("name", ["../outside", "/abs/path/x", "a/b", "a\\b", "..", ".", ""])
def test_adapter_names_that_are_paths_are_refused(name, tmp_path):
    tm = TINY_MODELS["gpt2"]()
    model = wrap(tm)
    with pytest.raises(ValueError, match="adapter name"):
        model.add_adapter(name, GraceConfig(target_modules=[tm.target], eps_init=tm.eps_init))
    assert name not in model.peft_config
    assert all(name not in module.grace_codebook for module in model.modules() if isinstance(module, GraceLayer))
    model.save_pretrained(tmp_path / "inside")
    assert not (tmp_path / "outside").exists()


# ---------------------------------------------------------------------------------------------- edit inputs
def codebook_state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in codebook_of(model).state_dict().items()}


def assert_unchanged(before: dict[str, torch.Tensor], model) -> None:
    after = codebook_of(model).state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize(("prompt", "target", "message"), [
    (" ".join(["the"] * 70), "canberra", "71 tokens long .prompt and target., but the model takes at most 64"),
    ("the capital is", " ".join(["paris"] * 70), "tokens long .prompt and target., but the model takes at most 64"),
    ("<eos>", "canberra", "only special tokens"),
    ("<eos> <pad>", "canberra", "only special tokens"),
    ("   ", "canberra", "non-empty prompt"),
    ("the capital of australia is", "", "non-empty target"),
    (3, "canberra", "non-empty prompt"),
], ids=["long-prompt", "long-target", "eos-prompt", "special-prompt", "blank-prompt", "empty-target", "int-prompt"])
def test_a_bad_edit_is_refused_before_anything_changes(prompt, target, message):
    tm = TINY_MODELS["gpt2"]()
    model = wrap(tm)
    editor = GraceEditor(model, tm.tokenizer, progress=False)
    editor.edit(NEAR_PROMPTS[0], "canberra")
    before = codebook_state(model)
    with pytest.raises(ValueError, match=message):
        editor.edit(prompt, target)
    assert_unchanged(before, model)


def test_edit_many_checks_the_whole_stream_before_the_first_edit():
    tm = TINY_MODELS["gpt2"]()
    model = wrap(tm)
    stream = [(NEAR_PROMPTS[0], "canberra"), ("<eos>", "paris"), ("who leads apple", "paris")]
    with pytest.raises(ValueError, match=r"Edit 1 of the stream: .*only special tokens.*No edit was applied"):
        GraceEditor(model, tm.tokenizer, progress=False).edit_many(stream)
    assert len(codebook_of(model)) == 0


def test_edit_many_that_fails_midway_says_which_edits_were_applied(monkeypatch):
    tm = TINY_MODELS["gpt2"]()
    model = wrap(tm)
    editor = GraceEditor(model, tm.tokenizer, progress=False)
    stream = [(NEAR_PROMPTS[0], "canberra"), ("who leads apple", "paris"), ("tim cook plays", "guitar")]
    calls = []
    original = editor._train

    def train_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise FloatingPointError("loss became nan")
        return original(*args, **kwargs)

    monkeypatch.setattr(editor, "_train", train_then_fail)
    with pytest.raises(EditsPartlyApplied) as info:
        editor.edit_many(stream)
    assert info.value.failed_index == 1
    assert [(report.prompt, report.target) for report in info.value.reports] == stream[:1]
    assert isinstance(info.value.__cause__, FloatingPointError)
    assert len(codebook_of(model)) == 1 and codebook_of(model).edit_ids.tolist() == [0]
