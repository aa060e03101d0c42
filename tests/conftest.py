"""Tiny random models (GPT-2, Llama, T5, BERT) and a word-level tokenizer, built in code: no downloads."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import pytest
import torch
from peft import PeftModel, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.utils import logging as hf_logging

import grace_peft  # noqa: F401  (registers the tuner)
from grace_peft import Codebook, EditReport, GraceConfig, GraceEditor, GraceLayer

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*loss_type=None.*")

WORDS = (
    "<pad> <eos> <bos> [CLS] [SEP] the capital of australia is canberra sydney paris france london berlin rome "
    "madrid what who where ceo apple microsoft tim cook satya leads a company city river mountain lives in plays "
    "piano guitar chess football my favourite colour red blue green"
).split()
VOCAB = {word: index for index, word in enumerate(WORDS)}
PAD, EOS, BOS = VOCAB["<pad>"], VOCAB["<eos>"], VOCAB["<bos>"]


def make_tokenizer(template: str | None = None, padding_side: str = "right") -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer over ``WORDS``; ``template`` adds special tokens ("bos", "cls")."""
    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if template == "bos":
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    elif template == "cls":
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", VOCAB["[CLS]"]), ("[SEP]", VOCAB["[SEP]"])]
        )
    # Only ids and mask, in every transformers release (older ones also return token_type_ids, which T5 refuses).
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", model_input_names=["input_ids", "attention_mask"])
    tokenizer.padding_side = padding_side
    return tokenizer


@dataclass
class TinyModel:
    """A tiny random model, how to build it again bit for bit, and what to target."""

    kind: str
    build: object  # () -> fresh model with the same weights
    tokenizer: PreTrainedTokenizerFast
    target: str  # module to wrap
    replacement: str  # replacement mode under which edits take on this tiny model
    eps_init: float  # radius matched to this model's activation scale (distances listed below)

    def fresh(self) -> torch.nn.Module:
        return self.build().eval()


def _seeded(factory):
    def build():
        torch.manual_seed(0)
        return factory()

    return build


def tiny_gpt2() -> TinyModel:
    config = GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    return TinyModel("gpt2", _seeded(lambda: GPT2LMHeadModel(config)), make_tokenizer(), "h.1.mlp.c_proj",
                     "replace_last", 0.2)


def tiny_llama() -> TinyModel:
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    return TinyModel("llama", _seeded(lambda: LlamaForCausalLM(config)), make_tokenizer("bos"),
                     "model.layers.1.mlp.down_proj", "replace_last", 0.02)


def tiny_t5() -> TinyModel:
    config = T5Config(vocab_size=len(WORDS), d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
                      decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS)
    # T5 reads the edit only through cross-attention to normalized encoder states; on a random tiny T5 only the
    # paper's broadcast (replace_all) steers it.
    return TinyModel("t5", _seeded(lambda: T5ForConditionalGeneration(config)), make_tokenizer(),
                     "encoder.block.1.layer.1.DenseReluDense.wo", "replace_all", 1.0)


def tiny_bert() -> TinyModel:
    config = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=3, pad_token_id=PAD)
    # The classifier reads [CLS]: an edit at the last layer must broadcast (replace_all) to reach it.
    return TinyModel("bert", _seeded(lambda: BertForSequenceClassification(config)), make_tokenizer("cls"),
                     "encoder.layer.1.output.dense", "replace_all", 0.1)


# Query distances measured on these models (query = input of the target at the last prompt token):
#   gpt2:  "the capital of australia is" vs "... france is" 0.02; vs "who leads apple" 1.00; others 0.5-1.1
#   llama: australia vs france 0.01; vs "who leads apple" 0.06; others 0.03-0.08
#   t5:    australia vs france 1.23; others 4.2-7.9
#   bert:  australia vs france 0.0008 (a split with tiny radii); vs "who leads apple" 0.36
# so with the eps_init above, australia/france overlap (split or expand) and "who leads apple" is far.
NEAR_PROMPTS = ("the capital of australia is", "the capital of france is")
FAR_PROMPT = "who leads apple"

TINY_MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "t5": tiny_t5, "bert": tiny_bert}


@pytest.fixture(params=["gpt2", "llama"])
def causal_lm(request) -> TinyModel:
    return TINY_MODELS[request.param]()


@pytest.fixture(params=list(TINY_MODELS))
def any_model(request) -> TinyModel:
    return TINY_MODELS[request.param]()


def target_for(kind: str) -> str | int:
    """A single-token edit target of the right type for each kind."""
    return 2 if kind == "bert" else "canberra"


# Edits that take on every tiny causal LM and T5, and prompts never edited (different lengths, far from the edits).
EDITS = (("the capital of australia is", "canberra"), ("who leads apple", "paris"), ("tim cook plays", "guitar"))
UNEDITED = ("satya lives in a city", "my favourite colour", "football")


def wrap(tm: TinyModel, base: torch.nn.Module | None = None, **overrides) -> PeftModel:
    """``tm``'s model (or ``base``) with a GRACE adapter at ``tm.target``, with the radius and replacement mode that
    suit that model; ``overrides`` are further GraceConfig fields."""
    config = dict(target_modules=[tm.target], replacement=tm.replacement, eps_init=tm.eps_init)
    config.update(overrides)
    return get_peft_model(tm.fresh() if base is None else base, GraceConfig(**config))


def apply_edits(model: PeftModel, tm: TinyModel, edits: Iterable[tuple[str, str | int]], *,
                must_take: bool = True) -> list[EditReport]:
    """Edit ``model`` one edit at a time; with ``must_take``, every edit must succeed (a broken test set-up)."""
    editor = GraceEditor(model, tm.tokenizer, progress=False)
    reports = [editor.edit(prompt, target) for prompt, target in edits]
    if must_take:
        failed = [(report.prompt, report.target) for report in reports if not report.success]
        assert not failed, f"setup: edits {failed} did not take on {tm.kind}"
    return reports


@functools.cache
def edited(kind: str, replacement: str | None = None, edits: tuple = EDITS) -> tuple[TinyModel, PeftModel]:
    """A tiny model of ``kind`` holding ``edits`` (cached: only for tests that run forwards and change nothing)."""
    tm = TINY_MODELS[kind]()
    model = wrap(tm, replacement=replacement or tm.replacement)
    apply_edits(model, tm, edits)
    return tm, model


def grace_layer(model: torch.nn.Module) -> GraceLayer:
    """The one GRACE layer of ``model``."""
    (layer,) = [module for module in model.modules() if isinstance(module, GraceLayer)]
    return layer


def codebook_of(model: torch.nn.Module, adapter: str = "default") -> Codebook:
    """The codebook of ``adapter`` at the one GRACE layer that holds it."""
    (layer,) = [module for module in model.modules() if isinstance(module, GraceLayer) and adapter in
                module.grace_codebook]
    return layer.grace_codebook[adapter]


def batch_logits(model: torch.nn.Module, tm: TinyModel, prompts=(*NEAR_PROMPTS, FAR_PROMPT)) -> torch.Tensor:
    """Logits of ``prompts`` as one padded batch (T5: of one decoder step)."""
    batch = tm.tokenizer(list(prompts), return_tensors="pt", padding=True)
    kwargs = {"decoder_input_ids": torch.zeros(len(prompts), 1, dtype=torch.long)} if tm.kind == "t5" else {}
    with torch.no_grad():
        return model(**batch, **kwargs).logits
