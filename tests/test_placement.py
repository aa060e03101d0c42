"""Device placement of the edit loop, offload refusal, mixed precision and data-parallel evaluation (on CPU).

The same placement rules on CUDA devices (one GPU, bf16, a ``device_map="auto"`` split over two GPUs) are in
``test_gpu.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator, dispatch_model, init_empty_weights
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from accelerate.state import AcceleratorState
from conftest import FAR_PROMPT, NEAR_PROMPTS, TINY_MODELS, TinyModel, grace_layer, tiny_gpt2, wrap
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from grace_peft import CodebookOperation, GraceConfig, GraceEditor, GraceLayer, Task
from grace_peft.apps.base_models import load_model
from grace_peft.evaluation import EditRecord, Evaluator, read_edits
from grace_peft.evaluation.distributed import evaluate_data_parallel, locality_reference_data_parallel
from grace_peft.inputs import per_row_loss
from grace_peft.query import IGNORE_INDEX

EDITS = [(NEAR_PROMPTS[0], "canberra"), (FAR_PROMPT, "paris"), (NEAR_PROMPTS[1], "paris")]
ADD, SPLIT = CodebookOperation.ADD, CodebookOperation.SPLIT
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "evaluate_data_parallel.py"
LLAMA_BLOCKS = ["model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]


def token(tm: TinyModel, word: str) -> int:
    return tm.tokenizer(word, add_special_tokens=False)["input_ids"][0]


def next_token(model: torch.nn.Module, tm: TinyModel, prompt: str) -> int:
    inputs = tm.tokenizer(prompt, return_tensors="pt").to(model.get_input_embeddings().weight.device)
    with torch.no_grad():
        return int(model(**inputs).logits[0, -1].argmax())


@pytest.fixture
def fresh_accelerate_state():
    """Accelerator and PartialState are process-wide singletons: start and leave each test with none."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# ---------------------------------------------------------------------------------------------- placement
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_codebook_grows_on_its_layer_device_in_float32_on_a_bf16_model(kind):
    tm = TINY_MODELS[kind]()
    model = wrap(tm, tm.fresh().to(torch.bfloat16))
    layer = grace_layer(model)
    reports = GraceEditor(model, tm.tokenizer, progress=False).edit_many(EDITS)

    assert [report.operation for report in reports] == [ADD, ADD, SPLIT]
    assert all(report.success for report in reports)
    book = layer.grace_codebook["default"]
    weight = layer.get_base_layer().weight
    assert len(book) == 3 and weight.dtype == torch.bfloat16
    for tensor in (book.keys, book.values, book.radii):
        assert tensor.dtype == torch.float32 and tensor.device == weight.device
    assert torch.isfinite(book.keys).all() and torch.isfinite(book.values).all()  # keys are the probe queries
    for prompt, target in EDITS:  # bf16 inference retrieves every edit, the split one included
        assert next_token(model, tm, prompt) == token(tm, target)


def test_each_edit_trains_a_fresh_adam_over_a_float32_copy_of_its_value(monkeypatch):
    created: list[torch.optim.Adam] = []

    class RecordingAdam(torch.optim.Adam):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            created.append(self)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    tm = TINY_MODELS["llama"]()
    model = wrap(tm)
    reports = GraceEditor(model, tm.tokenizer, progress=False).edit_many(EDITS)

    book = grace_layer(model).grace_codebook["default"]
    assert len(created) == len(EDITS) == len(book)  # one optimizer per edit, built after the codebook grew
    for index, (optimizer, report) in enumerate(zip(created, reports, strict=True)):
        (value,) = [param for group in optimizer.param_groups for param in group["params"]]
        assert value.dtype == torch.float32 and value.device == book.values.device
        assert value.shape == (book.value_dim,) and value is not book.values
        assert torch.equal(book.values[index], value.detach())  # the trained copy is what the codebook stored
        assert int(optimizer.state[value].get("step", 0)) == report.steps > 0


@pytest.mark.parametrize("task", [Task.CAUSAL_LM, Task.SEQUENCE_CLASSIFICATION])
def test_the_loss_is_computed_where_the_logits_are(task):
    # the meta device stands in for a second device: CPU labels must follow meta logits, not the other way round
    causal = task is Task.CAUSAL_LM
    logits = torch.zeros((2, 5, 7) if causal else (2, 7), device="meta")
    labels = torch.tensor([[IGNORE_INDEX] * 3 + [4, 1], [IGNORE_INDEX, 2, 2, 2, 2]] if causal else [0, 6])
    loss = per_row_loss(task, logits, labels)
    assert loss.device.type == "meta" and loss.shape == (2,)


def test_edits_through_accelerate_device_hooks_give_the_same_codebook():
    tm = TINY_MODELS["llama"]()
    plain = wrap(tm)
    plain_reports = GraceEditor(plain, tm.tokenizer, progress=False).edit_many(EDITS)
    hooked_base = dispatch_model(tm.fresh(), device_map=dict.fromkeys(LLAMA_BLOCKS, "cpu"), force_hooks=True)
    assert isinstance(hooked_base.model.layers[0]._hf_hook, AlignDevicesHook)
    hooked = wrap(tm, hooked_base)
    hooked_reports = GraceEditor(hooked, tm.tokenizer, progress=False).edit_many(EDITS)

    assert [r.operation for r in hooked_reports] == [r.operation for r in plain_reports]
    assert [r.steps for r in hooked_reports] == [r.steps for r in plain_reports]
    ours, theirs = grace_layer(hooked).grace_codebook["default"], grace_layer(plain).grace_codebook["default"]
    for name in ("keys", "values", "radii", "label_tokens"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name))


# ---------------------------------------------------------------------------------------------- offload refusal
def offloaded_llama(tmp_path: Path, block: str = "model.layers.1") -> torch.nn.Module:
    """The tiny Llama loaded from disk with ``block`` offloaded to disk by its device_map."""
    TINY_MODELS["llama"]().fresh().save_pretrained(tmp_path / "base")
    device_map = {name: "disk" if name == block else "cpu" for name in LLAMA_BLOCKS}
    return AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map=device_map,
                                                offload_folder=tmp_path / "offload").eval()


def test_target_in_a_disk_offloaded_block_is_refused_and_the_model_left_as_it_was(tmp_path):
    model = offloaded_llama(tmp_path)
    assert model.hf_device_map["model.layers.1"] == "disk"
    with pytest.raises(ValueError) as error:
        get_peft_model(model, GraceConfig(target_modules=["model.layers.1.mlp.down_proj"]))
    message = str(error.value)
    assert "Cannot put a GRACE codebook on 'model.layers.1.mlp.down_proj': accelerate offloads it" in message
    assert "needs the layer's real weights and a real device next to it" in message
    assert "device_map={..., 'model.layers.1': 0}" in message and "without offloading" in message
    assert not any(isinstance(module, GraceLayer) for module in model.modules())


def test_layer_below_an_offloaded_block_is_edited_as_without_offload(tmp_path):
    target = "model.layers.0.mlp.down_proj"
    tm = TINY_MODELS["llama"]()
    partly_offloaded = wrap(tm, offloaded_llama(tmp_path), target_modules=[target])
    reports = GraceEditor(partly_offloaded, tm.tokenizer, progress=False).edit_many(EDITS)
    resident = wrap(tm, target_modules=[target])
    expected = GraceEditor(resident, tm.tokenizer, progress=False).edit_many(EDITS)

    assert [r.operation for r in reports] == [r.operation for r in expected]
    assert all(report.success for report in reports)
    book = grace_layer(partly_offloaded).grace_codebook["default"]
    assert book.keys.device.type == "cpu" and book.values.dtype == torch.float32
    assert torch.allclose(book.keys, grace_layer(resident).grace_codebook["default"].keys)


def test_block_offloaded_by_an_accelerate_hook_is_refused():
    tm = TINY_MODELS["llama"]()
    model = tm.fresh()
    block = model.model.layers[1]
    # what accelerate's dispatch_model / cpu_offload attach to an offloaded block: weights kept in a map, placed on
    # the execution device for each forward
    add_hook_to_module(block, AlignDevicesHook(execution_device="cpu", offload=True, place_submodules=True,
                                               weights_map={name: t.clone() for name, t in block.state_dict().items()}))
    assert block.mlp.down_proj.weight.is_meta
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.down_proj': accelerate offloads it.*"
                                         r"device_map=\{\.\.\., 'model\.layers\.1': 0\}"):
        wrap(tm, model)


def test_meta_weights_are_refused():
    tm = TINY_MODELS["llama"]()
    with init_empty_weights():
        model = tm.build()
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.down_proj': its weights are on the meta device.*"
                                         r"real weights and a real device"):
        wrap(tm, model)


def test_low_cpu_mem_usage_load_is_accepted_and_keeps_editing_in_float32(tmp_path):
    tm = TINY_MODELS["llama"]()
    model = wrap(tm)
    GraceEditor(model, tm.tokenizer, progress=False).edit_many(EDITS[:2])
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(tm.fresh(), tmp_path, low_cpu_mem_usage=True)  # adapter allocated on meta
    book = grace_layer(again).grace_codebook["default"]
    assert not any(tensor.is_meta for tensor in (*book.parameters(), *book.buffers()))
    assert torch.equal(book.values, grace_layer(model).grace_codebook["default"].values)

    report = GraceEditor(again, tm.tokenizer, progress=False).edit(*EDITS[2])
    book = grace_layer(again).grace_codebook["default"]
    assert report.operation is SPLIT and report.success and len(book) == 3
    assert book.values.dtype == torch.float32 and book.values.device.type == "cpu"


# ---------------------------------------------------------------------------------------------- mixed precision
def edit_recording_dtypes(tm: TinyModel, accelerator) -> tuple[PeftModel, list, list[torch.dtype]]:
    """Edit ``EDITS`` with ``accelerator``; also returns the output dtype of the wrapped layer at every pass."""
    model = wrap(tm)
    layer = grace_layer(model)
    dtypes: list[torch.dtype] = []
    handle = layer.get_base_layer().register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    try:
        reports = GraceEditor(model, tm.tokenizer, progress=False, accelerator=accelerator).edit_many(EDITS)
    finally:
        handle.remove()
    return model, reports, dtypes


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_accelerator_runs_every_edit_pass_under_bf16_autocast_with_float32_codebooks(kind, fresh_accelerate_state):
    tm = TINY_MODELS[kind]()
    model, reports, dtypes = edit_recording_dtypes(tm, Accelerator(mixed_precision="bf16", cpu=True))

    assert all(report.success for report in reports)
    # probe + (steps + 1) training passes per edit (the last one shows the edit as inference sees it), all in bf16
    assert len(dtypes) == sum(report.steps + 2 for report in reports) and set(dtypes) == {torch.bfloat16}
    book = grace_layer(model).grace_codebook["default"]
    assert {tensor.dtype for tensor in (book.keys, book.values, book.radii)} == {torch.float32}
    assert grace_layer(model).get_base_layer().weight.dtype == torch.float32  # the model itself stays as loaded
    assert next_token(model, tm, FAR_PROMPT) == token(tm, "paris")  # outside autocast too


def test_fp16_loss_is_scaled_by_the_accelerators_gradient_scaler():
    class CountingScaler(torch.amp.GradScaler):
        calls = 0

        def scale(self, outputs):
            self.calls += 1
            return super().scale(outputs)

    class Fp16Accelerator:
        """What ``Accelerator(mixed_precision="fp16")`` gives the editor on a GPU (autocast and a scaler), on CPU."""

        scaler = CountingScaler("cpu")

        def autocast(self):
            return torch.autocast("cpu", dtype=torch.float16)

    tm = TINY_MODELS["llama"]()
    accelerator = Fp16Accelerator()
    model, reports, dtypes = edit_recording_dtypes(tm, accelerator)

    assert all(report.success for report in reports) and set(dtypes) == {torch.float16}
    assert accelerator.scaler.calls == sum(report.steps for report in reports) > 0  # one scaled backward per step
    assert grace_layer(model).grace_codebook["default"].values.dtype == torch.float32


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_ddp_wrapped_model_is_refused(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        tm = TINY_MODELS["gpt2"]()
        wrapped = torch.nn.parallel.DistributedDataParallel(wrap(tm))
        with pytest.raises(ValueError, match=r"wrapped in DistributedDataParallel\. Every edit changes the codebook"):
            GraceEditor(wrapped, tm.tokenizer)
    finally:
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------- data parallel
RECORDS = [
    {"prompt": "the capital of australia is", "target": "canberra", "rephrase": "what is the capital of australia",
     "locality_prompt": "who leads apple", "locality_answer": "tim cook"},
    {"prompt": "the ceo of apple is", "target": "satya", "rephrase": "who leads apple",
     "locality_prompt": "the capital of france is", "locality_answer": "paris"},
    {"prompt": "my favourite colour is", "target": "green", "locality_prompt": "where is the mountain",
     "locality_answer": "berlin"},
    {"prompt": "who plays chess", "target": "tim cook", "rephrase": "who plays piano"},
    {"prompt": "the river in london is", "target": "red", "rephrase": "what river lives in london",
     "locality_prompt": "who plays guitar", "locality_answer": "satya"},
]


def save_edited_gpt2(folder: Path) -> list[EditRecord]:
    """A tiny GPT-2 base folder (with tokenizer), ``edits.jsonl`` and the adapter after applying those edits."""
    tm = tiny_gpt2()
    tm.fresh().save_pretrained(folder / "base")
    tm.tokenizer.save_pretrained(folder / "base")
    (folder / "edits.jsonl").write_text("".join(json.dumps(record) + "\n" for record in RECORDS))
    records = read_edits(folder / "edits.jsonl")
    model = wrap(tm)
    GraceEditor(model, tm.tokenizer, progress=False).edit_many([(r.prompt, r.target) for r in records])
    model.save_pretrained(folder / "adapter")
    return records


def load_edited(folder: Path, device: str = "cpu") -> tuple[PeftModel, object]:
    base, tokenizer = load_model(str(folder / "base"))
    return PeftModel.from_pretrained(base, folder / "adapter").to(device).eval(), tokenizer


def single_process_scores(folder: Path, records: list[EditRecord], device: str = "cpu") -> dict[str, dict]:
    """Unedited (adapter disabled) and edited scores of one plain Evaluator over all records."""
    model, tokenizer = load_edited(folder, device)
    evaluator = Evaluator(model, tokenizer, batch_size=2)
    with model.disable_adapter():
        reference = evaluator.locality_reference(records)
        unedited = evaluator.score(records, reference)
    return {"unedited": dataclasses.asdict(unedited), "edited": dataclasses.asdict(evaluator.score(records, reference))}


@pytest.mark.parametrize("protocol", ["teacher_forced", "generation"])
def test_data_parallel_evaluation_in_one_process_is_the_evaluator(tmp_path, protocol, fresh_accelerate_state):
    records = save_edited_gpt2(tmp_path)
    model, tokenizer = load_edited(tmp_path)
    evaluator = Evaluator(model, tokenizer, protocol=protocol, batch_size=3)
    with model.disable_adapter():
        reference = locality_reference_data_parallel(model, tokenizer, records, protocol=protocol, batch_size=2)
        assert reference == evaluator.locality_reference(records)
    scores = evaluate_data_parallel(model, tokenizer, records, reference, protocol=protocol, batch_size=2)

    assert scores == evaluator.score(records, reference)
    assert scores.per_record["gen"][2] is None and scores.per_record["loc"][3] is None  # missing fields stay None
    with pytest.raises(ValueError, match="has 4 entries for 5 records"):
        evaluate_data_parallel(model, tokenizer, records, reference.subset(range(4)), protocol=protocol)


def launch_impossible() -> str | None:
    """Why two local CPU processes cannot be launched here, or None."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return "torch.distributed with the gloo backend is not available"
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
    except OSError as error:
        return f"cannot open a local port for the processes' rendezvous: {error}"
    return None


@pytest.mark.skipif(launch_impossible() is not None, reason=str(launch_impossible()))
@pytest.mark.parametrize("limit", [None, 1], ids=["uneven-shards", "one-process-idle"])
def test_example_gathers_from_two_processes_what_one_process_computes(tmp_path, limit):
    records = save_edited_gpt2(tmp_path)
    output = tmp_path / "scores.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLE),
               str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "edits.jsonl"), "--batch-size", "2",
               "--output", str(output), *(["--limit", str(limit)] if limit else [])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]

    gathered = json.loads(output.read_text())
    assert gathered["num_processes"] == 2 and "scored by 2 processes" in result.stdout
    expected = single_process_scores(tmp_path, records[:limit])
    assert gathered["edited"] == expected["edited"] and gathered["unedited"] == expected["unedited"]
    assert gathered["edited"]["rel"] > gathered["unedited"]["rel"]  # the adapter's edits were scored
