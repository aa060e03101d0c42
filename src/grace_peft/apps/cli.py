"""The ``grace-peft`` command: edit a model with GRACE, evaluate a saved adapter, inspect one.

Run ``grace-peft --help`` (or ``python -m grace_peft.apps.cli --help``). Every sub-command exits 0 on success and
2 with a one-line ``grace-peft: error: ...`` message on a usage or input error (missing model folder, bad edits
file, wrong module name, a folder that is not a GRACE adapter).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from peft import PeftModel, get_peft_model
from torch import nn
from transformers.utils import logging as hf_logging

from .. import adapter_files
from ..adapter_files import AdapterFileError, summarize_adapter
from ..atomic import atomic_file
from ..calibration import apply_calibration, calibrate
from ..codebook import SplitRule
from ..config import EARLY_STOP_RULES, OPTIMIZERS, REPLACEMENT_MODES, GraceConfig
from ..editing import EditReport, GraceEditor
from ..evaluation import FORMATS, EditFileError, EditRecord, Evaluator, Protocol, Scores, read_edits
from ..keys import KEY_FUNCTIONS
from ..model import codebook_sizes
from . import manage
from .base_models import (
    SMOLLM2,
    SMOLLM2_EPS_INIT,
    SMOLLM2_KEY_LAYER,
    SMOLLM2_LAYER,
    SMOLLM2_OPTIMIZER,
    SMOLLM2_REWORDING_SETTINGS,
    ModelLoadError,
    load_model,
    mlp_output_projection,
    smollm2_settings,
)
from .gguf import convert_gguf

PROG = "grace-peft"
ADAPTER_NAME = "default"
DTYPES = ("float32", "bfloat16", "float16")
METRICS = ("rel", "gen", "loc", "upstream")

# GraceConfig fields that `edit` options set (same names as the argparse dests); refused with --adapter.
CONFIG_OPTIONS = ("eps_init", "replacement", "max_steps", "learning_rate", "early_stop", "key", "eps_split",
                  "value_contexts", "optimizer", "subject_gate")


class CliError(Exception):
    """An input or usage error: reported as one line on stderr, exit code 2."""


# ---------------------------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    """Run the ``grace-peft`` command line; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) and usage errors (2): return the code instead of exiting
        return exit_.code if isinstance(exit_.code, int) else 0
    try:
        with warnings.catch_warnings(), _transformers_progress(not getattr(args, "no_progress", True)):
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
            return args.run(args)
    except (CliError, ModelLoadError) as error:
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a command that stopped reading (e.g. `| head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``grace-peft`` and its sub-commands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Lifelong model editing with GRACE as a PEFT adapter: apply (prompt, target) edits to a\n"
                    "transformers model, score a saved adapter, or look inside one. An adapter is a codebook at one\n"
                    "layer; the base model's weights never change.",
        epilog=f"examples:\n"
               f"  {PROG} edit {SMOLLM2} edits.jsonl --output my-edits --eps-init 1.0\n"
               f"  {PROG} eval {SMOLLM2} my-edits edits.jsonl --output scores.json\n"
               f"  {PROG} inspect my-edits\n\n"
               f"Run '{PROG} COMMAND --help' for the options of a command.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_edit_parser(commands)
    _add_calibrate_parser(commands)
    _add_eval_parser(commands)
    _add_inspect_parser(commands)
    _add_convert_parser(commands)
    _add_console_parser(commands)
    manage.add_parsers(commands)
    return parser


def _add_edit_parser(commands) -> None:
    edit = commands.add_parser(
        "edit", help="apply the edits of a file to a model and save the GRACE adapter",
        description="Apply the edits of EDITS in order to MODEL (one GraceEditor.edit per record) and save the "
                    "GRACE adapter to --output. Prints how many edits took, the codebook size and the median time "
                    "per edit.")
    _add_model_argument(edit)
    _add_edits_argument(edit)
    edit.add_argument("--output", "-o", required=True, metavar="DIR", help="folder to save the adapter to (required)")
    target = edit.add_mutually_exclusive_group()
    target.add_argument("--target-modules", nargs="+", metavar="NAME",
                        help="modules to wrap: full names or name suffixes (e.g. model.layers.20.mlp.down_proj)")
    target.add_argument("--layer", type=_non_negative_int, metavar="N",
                        help="wrap the MLP output projection of block N (Llama-like: model.layers.N.mlp.down_proj; "
                             "GPT-2: transformer.h.N.mlp.c_proj). Default when neither --layer nor --target-modules "
                             "is given: block 27 of a Llama-like model with at least 28 blocks, else the "
                             "second-to-last block")
    defaults = {item.name: item.default for item in dataclasses.fields(GraceConfig)}
    edit.add_argument("--eps-init", type=_positive_float, metavar="X",
                      help="radius of a new codebook key, in the key's space (measure it for a model with "
                           f"'{PROG} calibrate'; default: the measured one for {SMOLLM2} at its default layer "
                           f"{SMOLLM2_LAYER}, {SMOLLM2_EPS_INIT}, or {SMOLLM2_REWORDING_SETTINGS['eps_init']} with "
                           f"--rewording, see the README; else {defaults['eps_init']})")
    edit.add_argument("--rewording", action="store_true",
                      help=f"{SMOLLM2} only: the measured settings for edits that must also hold when the question "
                           f"is reworded (the key is block {SMOLLM2_KEY_LAYER}'s MLP input averaged over the prompt). "
                           "Prompts that share an edit's wording with another subject can then fire it too: see "
                           "the README's measurements")
    _add_rewording_options(edit, defaults)
    edit.add_argument("--replacement", choices=REPLACEMENT_MODES,
                      help=f"output positions a retrieved value replaces (default: {defaults['replacement']})")
    edit.add_argument("--max-steps", type=_positive_int, metavar="N",
                      help=f"most training steps per edit (default: {defaults['max_steps']})")
    edit.add_argument("--optimizer", choices=OPTIMIZERS,
                      help="how a value is trained: adam at --learning-rate, or line_search (no rate to choose; "
                           f"default: {SMOLLM2_OPTIMIZER} for {SMOLLM2} at its default layer, else "
                           f"{defaults['optimizer']})")
    edit.add_argument("--learning-rate", type=_positive_float, metavar="X",
                      help=f"Adam learning rate of an edit's value (default: {defaults['learning_rate']})")
    edit.add_argument("--early-stop", choices=EARLY_STOP_RULES,
                      help="stop training an edit once the target is predicted, once the loss is below the stop "
                           f"loss, or never (default: {defaults['early_stop']})")
    _add_format_options(edit)
    edit.add_argument("--adapter", metavar="DIR",
                      help="continue editing this saved GRACE adapter instead of creating a new one; its "
                           "configuration is kept, so the target and configuration options above are refused")
    edit.add_argument("--report", metavar="FILE.json", help="also write the per-edit reports as JSON")
    _add_chat(edit)
    edit.add_argument("--batch-size", type=_positive_int, default=1, metavar="K",
                      help="edits trained at once (default: 1); edits that reach each other's keys still go one by one")
    _add_no_progress(edit)
    edit.add_argument("--dtype", choices=DTYPES, default="float32",
                      help="dtype to load the model in (default: float32)")
    edit.set_defaults(run=run_edit)


def _add_rewording_options(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    parser.add_argument("--key", choices=KEY_FUNCTIONS,
                        help="what the codebook searches: the last prompt token's input (the paper) or the mean "
                             f"over the prompt (see the README; default: {defaults['key']})")
    parser.add_argument("--key-layer", type=_non_negative_int, metavar="N",
                        help="make the key of block N's MLP projection input instead of the edited module's own "
                             "(GraceConfig.key_module)")
    parser.add_argument("--eps-split", choices=[rule.value for rule in SplitRule],
                        help=f"radii on a SPLIT: halve (the paper) or keep (default: {defaults['eps_split']})")
    parser.add_argument("--value-contexts", type=_non_negative_int, metavar="N",
                        help="also train each value after N short texts the model writes itself, so that it carries "
                             f"the edit into a reworded prompt (default: {defaults['value_contexts']})")
    parser.add_argument("--subject-gate", action="store_true", default=None,
                        help="an edit fires only on prompts that contain its subject (each record's 'subject' field, "
                             "as the prompt spells it): the same question about another subject is left alone")


def _add_calibrate_parser(commands) -> None:
    calibrate = commands.add_parser(
        "calibrate", help="measure the radius (and key center) for a model from unrelated text; save an empty "
                          "adapter to edit with",
        description="Measure the radius of new keys for MODEL at the edited layer from background text (texts the "
                    "model generates itself, or --texts), for a stated false-hit rate, and save an empty GRACE "
                    "adapter with it to --output. Continue with: grace-peft edit MODEL EDITS --adapter DIR.")
    _add_model_argument(calibrate)
    calibrate.add_argument("--output", "-o", required=True, metavar="DIR", help="folder to save the adapter to")
    target = calibrate.add_mutually_exclusive_group()
    target.add_argument("--target-modules", nargs="+", metavar="NAME", help="modules to wrap (as for edit)")
    target.add_argument("--layer", type=_non_negative_int, metavar="N", help="wrap block N's MLP output "
                        "projection (as for edit)")
    defaults = {item.name: item.default for item in dataclasses.fields(GraceConfig)}
    _add_rewording_options(calibrate, defaults)
    calibrate.add_argument("--replacement", choices=REPLACEMENT_MODES,
                           help=f"output positions a retrieved value replaces (default: {defaults['replacement']})")
    calibrate.add_argument("--false-hit-rate", type=_positive_float, default=0.01, metavar="P",
                           help="fraction of unrelated prompts allowed within the radius of a key, with a codebook "
                                "as dense as the background set (default: 0.01)")
    calibrate.add_argument("--no-center", action="store_true",
                           help="keep the key center at zero (plain cosine between prompt means) instead of the "
                                "background mean")
    calibrate.add_argument("--texts", metavar="FILE",
                           help="background texts, one per line (default: 256 texts the model generates itself)")
    _add_no_progress(calibrate)
    calibrate.set_defaults(run=run_calibrate)


def _add_eval_parser(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="score a saved adapter on an edits file (Rel, Gen, Loc, upstream), edited vs. unedited",
        description="Score the GRACE adapter ADAPTER on MODEL with the records of EDITS: Rel (edit prompts), Gen "
                    "(rephrases), Loc (locality prompts: agreement with the unedited model's own predictions) and "
                    "upstream (accuracy on the locality answers), for the unedited base and the edited model.")
    _add_model_argument(evaluate)
    evaluate.add_argument("adapter", metavar="ADAPTER", help="folder of a saved GRACE adapter")
    _add_edits_argument(evaluate)
    evaluate.add_argument("--protocol", choices=[protocol.value for protocol in Protocol],
                          default=Protocol.TEACHER_FORCED.value,
                          help="teacher_forced: argmax at each target token given the gold prefix; generation: "
                               "greedy generation of as many tokens as the target has (default: teacher_forced)")
    _add_format_options(evaluate)
    evaluate.add_argument("--batch-size", type=_positive_int, default=16, metavar="N",
                          help="prompts per forward pass (default: 16)")
    evaluate.add_argument("--output", "-o", metavar="FILE.json",
                          help="also write the scores (with per-record values) as JSON")
    _add_chat(evaluate)
    _add_no_progress(evaluate)
    evaluate.set_defaults(run=run_eval)


def _add_inspect_parser(commands) -> None:
    inspect = commands.add_parser(
        "inspect", help="summarize a saved adapter's codebooks without loading a model",
        description="Read ADAPTER's adapter_config.json and adapter_model.safetensors (no model is loaded) and "
                    "print, per wrapped module, the number of keys, the radii (min / median / max), the number of "
                    "distinct edit ids and the range of the value norms, with the adapter's configuration.")
    inspect.add_argument("adapter", metavar="ADAPTER", help="folder of a saved GRACE adapter")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(run=run_inspect)


def _add_convert_parser(commands) -> None:
    convert = commands.add_parser(
        "convert-gguf", help="turn a GGUF model file into a checkpoint folder that every command takes as MODEL",
        description="Load GGUF_FILE with transformers (dequantized to float32) and save it with its tokenizer as a "
                    "checkpoint folder at --output, for models that install as GGUF files from the package index "
                    "(e.g. gemma-3-270m, see the README). Needs the gguf package.")
    convert.add_argument("gguf_file", metavar="GGUF_FILE", help="the .gguf file")
    convert.add_argument("--output", "-o", required=True, metavar="DIR", help="checkpoint folder to write")
    convert.set_defaults(run=run_convert)


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help=f"a local transformers model folder (causal or seq2seq LM, with its tokenizer), or "
                             f"'{SMOLLM2}' for SmolLM2-135M-Instruct from the package index")


def _add_edits_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("edits", metavar="EDITS",
                        help="edits file: a JSON list or JSON Lines of zsRE, CounterFact or plain "
                             "(prompt, target, rephrase, locality_prompt, locality_answer) records")


def _add_format_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("auto", *FORMATS), default="auto",
                        help="format of EDITS; auto detects it from the first record's keys (default: auto)")
    parser.add_argument("--limit", type=_non_negative_int, metavar="N",
                        help="use only the first N records (default: all)")


def _add_chat(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chat", action="store_true",
                        help="render each prompt as a user turn of the tokenizer's chat template (chat/instruct "
                             "models); use the same setting for edit and eval")


def _add_no_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")


# ---------------------------------------------------------------------------------------------- edit
def run_edit(args: argparse.Namespace) -> int:
    """``grace-peft edit``: apply the edits and save the adapter."""
    check_configuration_options(args, "--adapter continues an adapter with its own configuration")
    records = load_records(args.edits, args.format, args.limit)
    peft_model, tokenizer = model_to_edit(args)
    check_chat(args.chat, tokenizer, args.model)
    editor = GraceEditor(peft_model, tokenizer, progress=not args.no_progress, chat=args.chat)
    started = time.perf_counter()
    try:
        reports = editor.edit_many([(record.prompt, record.target, record.subject) for record in records],
                                   batch_size=args.batch_size)
    except ValueError as error:  # the stream is checked before the first edit: nothing was applied
        raise CliError(f"{args.edits}: {error}") from None
    seconds = time.perf_counter() - started
    peft_model.save_pretrained(args.output)

    print_edit_summary(reports, list(editor.layers), editor.num_keys(), seconds)
    print(f"adapter saved to {args.output}")
    if args.report:
        write_json(args.report, {
            "model": args.model, "edits_file": args.edits, "adapter": args.output, "continued_from": args.adapter,
            "target_modules": list(editor.layers), "num_keys": editor.num_keys(), "seconds": seconds,
            "edits": [{"source_index": record.source_index, **report.to_dict()}
                      for record, report in zip(records, reports, strict=True)],
        })
        print(f"report written to {args.report}")
    return 0


def configuration_options(args: argparse.Namespace) -> dict[str, Any]:
    """The GraceConfig fields the command line sets (:data:`CONFIG_OPTIONS` that were given)."""
    return {name: getattr(args, name) for name in CONFIG_OPTIONS if getattr(args, name, None) is not None}


def check_configuration_options(args: argparse.Namespace, why: str) -> None:
    """With ``args.adapter``, refuse the options that would configure a new adapter (``why``: the reason), and
    check the adapter folder before any model loads."""
    if not args.adapter:
        return
    given = [name for name in ("target_modules", "layer", "key_layer") if getattr(args, name) is not None]
    given += ["rewording"] if args.rewording else []
    given += list(configuration_options(args))
    if given:
        drop = ", ".join("--" + name.replace("_", "-") for name in given)
        raise CliError(f"{why}; drop {drop}")
    read_adapter_config(args.adapter)  # fail before loading the model


def model_to_edit(args: argparse.Namespace) -> tuple[PeftModel, Any]:
    """MODEL with the adapter ``args.adapter``, or with a new adapter configured by the options (SmolLM2's
    measured settings where they apply), and its tokenizer."""
    model, tokenizer = load_model(args.model, args.dtype)
    if args.adapter:
        return load_adapter(model, args.adapter, is_trainable=False), tokenizer
    options = configuration_options(args)
    defaults = smollm2_defaults(model, args)
    peft_model = wrap_model(model, args, {**defaults, **options})
    if "eps_init" not in options and "eps_init" not in defaults:
        print(f"{PROG}: note: no radius is measured for this model and layer, so eps_init is "
              f"{GraceConfig.eps_init} in the key's own scale; measure one with '{PROG} calibrate {args.model} "
              f"-o DIR' (same target and key options) and edit with --adapter DIR", file=sys.stderr)
    return peft_model, tokenizer


def smollm2_defaults(model: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """SmolLM2's measured settings (the rewording ones with ``--rewording``), when SmolLM2 is edited at its default
    layer with no key option."""
    at_default = args.model == SMOLLM2 and not args.target_modules and args.layer in (None, SMOLLM2_LAYER)
    key_options = [name for name in ("key", "key_layer", "eps_split") if getattr(args, name) is not None]
    if args.rewording and (not at_default or key_options):
        raise CliError(f"--rewording is SmolLM2's measured setting at its default layer: use it with MODEL "
                       f"{SMOLLM2} and without --target-modules, --layer or key options")
    if not at_default or key_options:
        return {}
    settings = smollm2_settings(model, rewording=args.rewording)
    settings.pop("target_modules")
    return settings


def wrap_model(model: nn.Module, args: argparse.Namespace, options: dict[str, Any]) -> PeftModel:
    """``model`` with a new GRACE adapter at the modules the target options name."""
    if args.key_layer is not None:
        options["key_module"] = mlp_output_projection(model, args.key_layer)
    try:
        config = GraceConfig(target_modules=resolve_targets(model, args.target_modules, args.layer), **options)
        return get_peft_model(model, config)
    except (ValueError, TypeError, NotImplementedError) as error:  # a module GRACE cannot wrap, a bad option
        raise CliError(str(error)) from None


# ---------------------------------------------------------------------------------------------- calibrate
def run_calibrate(args: argparse.Namespace) -> int:
    """``grace-peft calibrate``: measure the radius on background text and save an empty adapter with it."""
    if not 0 < args.false_hit_rate < 1:
        raise CliError(f"--false-hit-rate must be between 0 and 1, got {args.false_hit_rate}")
    texts = None
    if args.texts:
        try:
            with open(args.texts, encoding="utf-8") as file:
                texts = [line.strip() for line in file if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise CliError(f"cannot read --texts {args.texts}: {error}") from None
    model, tokenizer = load_model(args.model)
    options = {name: getattr(args, name) for name in ("key", "eps_split", "replacement", "value_contexts",
                                                       "subject_gate") if getattr(args, name) is not None}
    peft_model = wrap_model(model, args, options)
    try:
        result = calibrate(peft_model, tokenizer, texts, false_hit_rate=args.false_hit_rate,
                           center=not args.no_center, progress=not args.no_progress)
    except ValueError as error:
        raise CliError(str(error)) from None
    apply_calibration(peft_model, result)
    peft_model.save_pretrained(args.output)
    config = peft_model.peft_config[ADAPTER_NAME]
    print(f"GRACE calibration of {', '.join(sorted(config.target_modules))} (key {config.key}"
          f"{' of ' + config.key_module if config.key_module else ''}) on {result.texts} background texts")
    for name, distances in result.nearest_distances.items():
        print(f"  {name}: nearest-background distance median {statistics.median(distances):.4g}, "
              f"{args.false_hit_rate:g} quantile {result.eps_init:.4g}")
    print(f"  eps_init        {result.eps_init:.4g}")
    print(f"empty adapter saved to {args.output}; edit with: {PROG} edit {args.model} EDITS --adapter {args.output}")
    return 0


# ---------------------------------------------------------------------------------------------- convert-gguf
def run_convert(args: argparse.Namespace) -> int:
    """``grace-peft convert-gguf``: save a GGUF model as a checkpoint folder."""
    occupied = os.path.isfile(args.output) or (os.path.isdir(args.output) and os.listdir(args.output))
    if occupied and not os.path.isfile(os.path.join(args.output, "config.json")):
        raise CliError(f"--output {args.output} already holds something else than a checkpoint; choose a new folder")
    try:
        folder = convert_gguf(args.gguf_file, args.output)
    except (FileNotFoundError, ModuleNotFoundError, ValueError, OSError) as error:
        raise CliError(f"cannot convert {args.gguf_file}: {error}") from None
    print(f"checkpoint folder {folder}; use it as MODEL, e.g. {PROG} calibrate {folder} -o DIR")
    return 0


def print_edit_summary(reports: Sequence[EditReport], modules: Sequence[str], num_keys: int, seconds: float) -> None:
    """Edits applied, how many took and were skipped, the codebook size and the median time per edit."""
    skipped = sum(report.skipped for report in reports)
    applied = len(reports) - skipped
    took = sum(report.success and not report.skipped for report in reports)
    median = statistics.median(report.seconds for report in reports)
    print(f"GRACE edit of {', '.join(modules)}: {len(reports)} edits in {seconds:.1f} s")
    for label, value in (("edits applied", applied), ("took", f"{took} / {applied}"), ("skipped", skipped),
                         ("codebook keys", num_keys), ("median", f"{median:.3f} s/edit")):
        print(f"  {label:<15} {value}")


def resolve_targets(model: nn.Module, target_modules: Sequence[str] | None, layer: int | None) -> list[str]:
    """The modules to wrap: ``target_modules`` (the tuner checks them), else the MLP output projection of
    ``--layer`` (or of the default layer)."""
    return list(target_modules) if target_modules else [mlp_output_projection(model, layer)]


# ---------------------------------------------------------------------------------------------- eval
def run_eval(args: argparse.Namespace) -> int:
    """``grace-peft eval``: score the unedited base and the adapter on the same records."""
    records = load_records(args.edits, args.format, args.limit)
    read_adapter_config(args.adapter)
    model, tokenizer = load_model(args.model)
    check_chat(args.chat, tokenizer, args.model)
    options = {"protocol": args.protocol, "batch_size": args.batch_size, "progress": not args.no_progress,
               "chat": args.chat}
    # The unedited scores and the locality reference come from the base before the adapter is injected.
    unedited_evaluator = Evaluator(model, tokenizer, **options)
    reference = unedited_evaluator.locality_reference(records)
    unedited = unedited_evaluator.score(records, reference)
    peft_model = load_adapter(model, args.adapter, is_trainable=False)
    edited = Evaluator(peft_model, tokenizer, **options).score(records, reference)
    num_keys = sum(shape["size"] for shape in codebook_sizes(peft_model, ADAPTER_NAME).values())

    print(f"GRACE eval of {args.adapter} ({num_keys} keys) on {len(records)} records of {args.edits}")
    print_score_table(args.protocol, unedited, edited)
    if args.output:
        write_json(args.output, {
            "protocol": args.protocol, "model": args.model, "adapter": args.adapter, "edits_file": args.edits,
            "num_records": len(records), "num_keys": num_keys,
            "unedited": dataclasses.asdict(unedited), "edited": dataclasses.asdict(edited),
        })
        print(f"scores written to {args.output}")
    return 0


def print_score_table(protocol: str, unedited: Scores, edited: Scores) -> None:
    """Rel, Gen, Loc and upstream of the unedited and the edited model ("-" where no record has the field)."""
    print(f"{'metric (' + protocol + ')':<26} {'unedited':>9} {'edited':>9}")
    for metric in METRICS:
        label = "upstream" if metric == "upstream" else metric.capitalize()
        before, after = (_number(getattr(scores, metric), ".3f") for scores in (unedited, edited))
        print(f"{label:<26} {before:>9} {after:>9}")


# ---------------------------------------------------------------------------------------------- inspect
def run_inspect(args: argparse.Namespace) -> int:
    """``grace-peft inspect``: summarize a saved adapter from its files alone."""
    try:
        summary = summarize_adapter(args.adapter)
    except AdapterFileError as error:
        raise CliError(str(error)) from None
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    config = summary["config"]
    print(f"GRACE adapter {args.adapter}: {summary['num_keys']} keys in {len(summary['modules'])} module(s)")
    for key in ("base_model", "target_modules", "eps_init", "eps_expand", "replacement"):
        value = config[key]
        print(f"  {key.replace('_', ' '):<15} {', '.join(value) if isinstance(value, list) else value}")
    for name, module in summary["modules"].items():
        radii, norms = module["radii"], module["value_norms"]
        print(name)
        print(f"  {'keys':<15} {module['keys']} (key dim {module['key_dim']}, value dim {module['value_dim']})")
        print(f"  {'edit ids':<15} {module['distinct_edit_ids']} distinct, {module['edits_seen']} edits seen, "
              f"{module['journal_records']} in the journal")
        if module["gated_entries"]:
            print(f"  {'subject gates':<15} on {module['gated_entries']} of {module['keys']} entries")
        print(f"  {'radii':<15} min {_number(radii['min'])}, median {_number(radii['median'])}, "
              f"max {_number(radii['max'])}")
        print(f"  {'value norms':<15} {_number(norms['min'])} to {_number(norms['max'])}")
    return 0


# ---------------------------------------------------------------------------------------------- console
def _add_console_parser(commands) -> None:
    console = commands.add_parser(
        "console", help="a local web page to ask the model, correct its answers (edits), see which edit fired, undo "
                        "edits and save the adapter (needs gradio)",
        description="Serve the edit console on this machine: ask MODEL a prompt (greedy answer), correct the answer "
                    "(a GRACE edit), see for every answer which edit fired and at what distance, undo an edit, save "
                    "the adapter. Edits ADAPTER when given, else a new adapter. Needs gradio: pip install "
                    "\"grace-peft[console]\". Stop it with Ctrl-C.")
    _add_model_argument(console)
    console.add_argument("adapter", metavar="ADAPTER", nargs="?",
                         help="folder of a saved GRACE adapter to keep editing (default: a new adapter)")
    console.add_argument("--output", "-o", metavar="DIR",
                         help="folder the page's Save button writes to (default: ADAPTER, else grace-console-edits)")
    target = console.add_mutually_exclusive_group()
    target.add_argument("--target-modules", nargs="+", metavar="NAME", help="new adapter: modules to wrap (as for "
                        "edit)")
    target.add_argument("--layer", type=_non_negative_int, metavar="N",
                        help="new adapter: wrap block N's MLP output projection (as for edit)")
    defaults = {item.name: item.default for item in dataclasses.fields(GraceConfig)}
    console.add_argument("--eps-init", type=_positive_float, metavar="X",
                         help="new adapter: radius of a new key (default: as for edit)")
    console.add_argument("--rewording", action="store_true",
                         help=f"new adapter, {SMOLLM2} only: the measured settings for edits that also hold when the "
                              "question is reworded (as for edit)")
    _add_rewording_options(console, defaults)
    _add_chat(console)
    console.add_argument("--max-new-tokens", type=_positive_int, default=20, metavar="N",
                         help="length of an answer in tokens (default: 20)")
    console.add_argument("--host", default="127.0.0.1",
                         help="address to serve on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the "
                              "network: anyone who reaches it can edit and save)")
    console.add_argument("--port", type=_positive_int, metavar="PORT",
                         help="port to serve on (default: the first free one from 7860)")
    console.add_argument("--open", action="store_true", help="open the page in the default web browser")
    console.add_argument("--dtype", choices=DTYPES, default="float32",
                         help="dtype to load the model in (default: float32)")
    console.set_defaults(run=run_console)


def run_console(args: argparse.Namespace) -> int:
    """``grace-peft console``: load the model (and adapter) and serve the edit console until Ctrl-C."""
    from . import console  # gradio is imported only by this command

    try:
        console.import_gradio()
    except console.ConsoleUnavailable as error:
        raise CliError(str(error)) from None
    check_configuration_options(args, "ADAPTER is edited with its own configuration")
    peft_model, tokenizer = model_to_edit(args)
    check_chat(args.chat, tokenizer, args.model)
    editor = GraceEditor(peft_model, tokenizer, progress=False, chat=args.chat)
    try:
        console.serve(peft_model, tokenizer, editor, adapter_folder=args.output or args.adapter,
                      max_new_tokens=args.max_new_tokens, host=args.host, port=args.port, open_browser=args.open)
    except (ValueError, OSError) as error:  # a classifier model, a port in use
        raise CliError(str(error)) from None
    return 0


# ---------------------------------------------------------------------------------------------- shared helpers
def check_chat(chat: bool, tokenizer, model: str) -> None:
    """--chat needs a tokenizer with a chat template."""
    if chat and not getattr(tokenizer, "chat_template", None):
        raise CliError(f"--chat: the tokenizer of {model} has no chat template; drop --chat")


def load_records(path: str, format: str, limit: int | None) -> list[EditRecord]:
    """The records of an edits file; reader warnings (skipped records) become ``grace-peft: warning:`` lines."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            records = read_edits(path, format, limit=limit)
    except (EditFileError, FileNotFoundError, IsADirectoryError, UnicodeDecodeError) as error:
        raise CliError(f"bad edits file: {error}") from None
    for warning in caught:
        print(f"{PROG}: warning: {warning.message}", file=sys.stderr)
    if not records:
        raise CliError(f"no edits to use in {path}")
    return records


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of a GRACE adapter folder; anything else is a :class:`CliError`."""
    try:
        return adapter_files.read_adapter_config(folder)
    except AdapterFileError as error:
        raise CliError(str(error)) from None


def load_adapter(model: nn.Module, folder: str, *, is_trainable: bool) -> PeftModel:
    """Wrap ``model`` with the GRACE adapter saved in ``folder`` (checked first with :func:`read_adapter_config`)."""
    try:
        return PeftModel.from_pretrained(model, folder, is_trainable=is_trainable)
    except (OSError, ValueError) as error:  # missing weights, codebooks that do not fit this model
        raise CliError(f"cannot load the adapter {folder} onto this model: {error}") from None


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as JSON atomically; NaN/inf become null."""
    with atomic_file(path) as file:
        json.dump(_finite(data), file, indent=2, allow_nan=False)
        file.write("\n")


def _finite(data: Any) -> Any:
    """``data`` with non-finite floats replaced by None (strict JSON has no NaN)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(value) for value in data]
    return data


def _number(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


@contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Show transformers' own progress bars (weight loading) only when ``enabled``; restore the setting after."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _number_option(convert, check, requirement: str):
    """An argparse ``type`` converting with ``convert`` and accepting values that pass ``check``."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not check(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    return parse


_positive_int = _number_option(int, lambda value: value >= 1, "a positive integer")
_non_negative_int = _number_option(int, lambda value: value >= 0, "an integer >= 0")
_positive_float = _number_option(float, lambda value: math.isfinite(value) and value > 0, "a positive number")


if __name__ == "__main__":
    sys.exit(main())
