"""The edit loop on CUDA devices: one GPU, a bf16 model, accelerate mixed precision, a ``device_map="auto"`` split
over two GPUs, and data-parallel evaluation on two GPUs. Skipped without CUDA (the CPU rules are in
``test_placement.py``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import BOS, EOS, PAD, TINY_MODELS, WORDS, TinyModel, grace_layer, make_tokenizer, wrap
from test_placement import (
    EDITS,
    EXAMPLE,
    edit_recording_dtypes,
    next_token,
    save_edited_gpt2,
    single_process_scores,
    token,
)
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from grace_peft import GraceEditor, Task
from grace_peft.inputs import per_row_loss
from grace_peft.query import IGNORE_INDEX

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@pytest.fixture
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def assert_float32_on(book, device: torch.device) -> None:
    for tensor in (book.keys, book.values, book.radii):
        assert tensor.dtype == torch.float32 and tensor.device == device
    assert book.label_tokens.device == device and torch.isfinite(book.keys).all()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_edit_loop_on_cuda_keeps_float32_codebooks_there_and_matches_cpu(kind):
    tm = TINY_MODELS[kind]()
    on_cpu = wrap(tm)
    expected = GraceEditor(on_cpu, tm.tokenizer, progress=False).edit_many(EDITS)
    on_cuda = wrap(tm, tm.fresh().to("cuda"))
    reports = GraceEditor(on_cuda, tm.tokenizer, progress=False).edit_many(EDITS)

    assert [r.operation for r in reports] == [r.operation for r in expected]
    assert all(report.success for report in reports)
    book = grace_layer(on_cuda).grace_codebook["default"]
    assert_float32_on(book, torch.device("cuda", 0))
    torch.testing.assert_close(book.keys.cpu(), grace_layer(on_cpu).grace_codebook["default"].keys,
                               rtol=1e-4, atol=1e-5)
    for prompt, target in EDITS:
        assert next_token(on_cuda, tm, prompt) == token(tm, target)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_bf16_model_on_cuda_is_edited_with_float32_codebooks(kind):
    tm = TINY_MODELS[kind]()
    model = wrap(tm, tm.fresh().to("cuda", torch.bfloat16))
    reports = GraceEditor(model, tm.tokenizer, progress=False).edit_many(EDITS)

    assert all(report.success for report in reports)
    assert_float32_on(grace_layer(model).grace_codebook["default"], torch.device("cuda", 0))
    for prompt, target in EDITS:
        assert next_token(model, tm, prompt) == token(tm, target)


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_accelerator_mixed_precision_on_cuda(precision, dtype, fresh_accelerate_state):
    accelerator = Accelerator(mixed_precision=precision)
    assert accelerator.device.type == "cuda" and (accelerator.scaler is not None) == (precision == "fp16")
    llama = TINY_MODELS["llama"]()
    tm = TinyModel(llama.kind, lambda: llama.build().to(accelerator.device), llama.tokenizer, llama.target,
                   llama.replacement, llama.eps_init)
    model, reports, dtypes = edit_recording_dtypes(tm, accelerator)

    assert all(report.success for report in reports)
    assert len(dtypes) == sum(report.steps + 3 for report in reports) and set(dtypes) == {dtype}
    assert_float32_on(grace_layer(model).grace_codebook["default"], torch.device("cuda", 0))


def tiny_llama_4_blocks(folder) -> TinyModel:
    """A 4-block Llama saved to ``folder``; ``device_map="auto"`` over two GPUs puts blocks 2-3 and the LM head on
    GPU 1 (checked in the test)."""
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, bos_token_id=BOS,
                         eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return TinyModel("llama", lambda: AutoModelForCausalLM.from_pretrained(folder), make_tokenizer("bos"),
                     "model.layers.3.mlp.down_proj", "replace_last", 0.02)


@two_gpus
def test_device_map_auto_split_edits_the_layer_on_gpu_1_with_the_loss_on_the_last_device(tmp_path):
    tm = tiny_llama_4_blocks(tmp_path)
    split = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto",
                                                 max_memory={0: "20GiB", 1: "20GiB"}).eval()
    placed = split.hf_device_map
    assert placed["model.embed_tokens"] == 0 and placed["model.layers.3"] == 1 and placed["lm_head"] == 1, placed
    model = wrap(tm, split)
    reports = GraceEditor(model, tm.tokenizer, progress=False).edit_many(EDITS)

    assert all(report.success for report in reports)
    assert model.get_input_embeddings().weight.device == torch.device("cuda", 0)  # where the editor puts inputs
    assert_float32_on(grace_layer(model).grace_codebook["default"], torch.device("cuda", 1))
    head_devices = []
    handle = split.lm_head.register_forward_hook(lambda module, args, output: head_devices.append(output.device))
    inputs = tm.tokenizer(EDITS[0][0], return_tensors="pt").to("cuda:0")
    with torch.no_grad():
        logits = model(**inputs).logits
    handle.remove()
    assert head_devices == [torch.device("cuda", 1)]  # the logits are computed on the last device...
    assert logits.device == torch.device("cuda", 0)  # ...and accelerate's root hook returns them to the inputs'
    labels = torch.full(logits.shape[:2], IGNORE_INDEX)
    labels[0, -1] = token(tm, "canberra")
    assert per_row_loss(Task.CAUSAL_LM, logits, labels).device == logits.device  # labels follow the logits
    for prompt, target in EDITS:
        assert next_token(model, tm, prompt) == token(tm, target)

    one_gpu = wrap(tm, tm.fresh().to("cuda:0"))
    expected = GraceEditor(one_gpu, tm.tokenizer, progress=False).edit_many(EDITS)
    assert [r.operation for r in reports] == [r.operation for r in expected]
    torch.testing.assert_close(grace_layer(model).grace_codebook["default"].keys.cpu(),
                               grace_layer(one_gpu).grace_codebook["default"].keys.cpu(), rtol=1e-4, atol=1e-5)


@two_gpus
def test_example_on_two_gpus_gathers_what_one_gpu_computes(tmp_path):
    records = save_edited_gpt2(tmp_path)
    output = tmp_path / "scores.json"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), str(EXAMPLE), str(tmp_path / "base"), str(tmp_path / "adapter"),
               str(tmp_path / "edits.jsonl"), "--batch-size", "2", "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]

    gathered = json.loads(output.read_text())
    assert gathered["num_processes"] == 2
    expected = single_process_scores(tmp_path, records, device="cuda:0")
    assert gathered["edited"] == expected["edited"] and gathered["unedited"] == expected["unedited"]
