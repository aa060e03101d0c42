"""``grace-peft list / remove / merge / trace``: living with the edits of a saved adapter.

``list``, ``remove`` and ``merge`` work on the adapter's files alone (no model is loaded); ``trace`` runs a prompt
through the model with the adapter and shows, per wrapped module, the nearest codebook entries and the one that
fired.
"""

from __future__ import annotations

import argparse
import json

from ..adapter_files import AdapterFileError, read_adapter_config, saved_codebooks, write_adapter
from ..codebook import Removal
from ..editing import GraceEditor
from ..inputs import Task
from ..inspection import edit_history, greedy_answer
from ..merging import merge_codebook, merged_edit_ids


def add_parsers(commands) -> None:
    """Add the sub-commands to ``commands`` (the sub-parsers of :func:`grace_peft.apps.cli.build_parser`)."""
    from . import cli  # shares its argument helpers and error type (imported here: cli imports this module)

    listing = commands.add_parser(
        "list", help="list the edits an adapter's journal holds (ids, operations, radii, targets)",
        description="Read ADAPTER's files (no model is loaded) and print every edit its journal records: id, "
                    "operation per module, the entry it created or trained and that entry's radius now, the target "
                    "(token ids, or text with --tokenizer), steps and success, and the prompt and target text when "
                    "the adapter kept them (GraceConfig.journal_text).")
    listing.add_argument("adapter", metavar="ADAPTER", help="folder of a saved GRACE adapter")
    listing.add_argument("--tokenizer", metavar="MODEL", help="decode targets with this model's tokenizer (a model "
                         f"folder or '{cli.SMOLLM2}')")
    listing.add_argument("--json", action="store_true", help="print the edits as JSON")
    listing.set_defaults(run=run_list)

    remove = commands.add_parser(
        "remove", help="take edits back by id and save the adapter without them",
        description="Take the edits --edit-id back from ADAPTER (its files alone; no model is loaded) and save the "
                    "result to --output: what each edit created leaves the codebook, and what it changed goes back "
                    "to its state before it, unless a later edit changed it since (printed as NOT restored).")
    remove.add_argument("adapter", metavar="ADAPTER", help="folder of a saved GRACE adapter")
    remove.add_argument("--edit-id", type=cli._non_negative_int, action="append", required=True, metavar="N",
                        dest="edit_ids", help="edit to take back (repeat for several; see 'list')")
    remove.add_argument("--output", "-o", required=True, metavar="DIR",
                        help="folder to save the adapter to (may be ADAPTER itself)")
    remove.set_defaults(run=run_remove)

    merge = commands.add_parser(
        "merge", help="merge two adapters made for the same base model and layers",
        description="Replay the codebook entries of SECOND into FIRST under GRACE's rules (oldest edit first: add "
                    "where no key is near, join a key with the same target, split or overwrite one with another "
                    "target: those are reported as conflicts) and save the result to --output. Files only.")
    merge.add_argument("first", metavar="FIRST", help="folder of the adapter merged into")
    merge.add_argument("second", metavar="SECOND", help="folder of the adapter whose edits are added")
    merge.add_argument("--output", "-o", required=True, metavar="DIR", help="folder to save the merged adapter to")
    merge.set_defaults(run=run_merge)

    trace = commands.add_parser(
        "trace", help="show which edit answers a prompt: nearest entries, distances, radii, what fired",
        description="Load MODEL with ADAPTER, answer PROMPT greedily with and without the adapter, and print for "
                    "every wrapped module the nearest codebook entries (edit id, distance, radius, target) and "
                    "whether one fired.")
    cli._add_model_argument(trace)
    trace.add_argument("adapter", metavar="ADAPTER", help="folder of a saved GRACE adapter")
    trace.add_argument("prompt", metavar="PROMPT", help="the prompt to trace")
    trace.add_argument("--neighbours", type=cli._positive_int, default=3, metavar="K",
                       help="nearest entries shown per module (default: 3)")
    trace.add_argument("--max-new-tokens", type=cli._non_negative_int, default=12, metavar="N",
                       help="tokens of the answers printed (default: 12; 0: no answers)")
    trace.add_argument("--json", action="store_true", help="print the trace as JSON")
    cli._add_chat(trace)
    trace.set_defaults(run=run_trace)


def run_list(args: argparse.Namespace) -> int:

    codebooks = _codebooks(args.adapter)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        from .base_models import model_folder

        tokenizer = AutoTokenizer.from_pretrained(model_folder(args.tokenizer))
    history = edit_history(codebooks, tokenizer)
    if args.json:
        print(json.dumps([edit.to_dict() for edit in history], indent=2, ensure_ascii=False))
        return 0
    edits_seen = max(int(codebook.next_edit_id) for codebook in codebooks.values())
    print(f"GRACE adapter {args.adapter}: {len(history)} edits in its journal ({edits_seen} made, "
          f"{sum(len(codebook) for codebook in codebooks.values())} keys)")
    several = len(codebooks) > 1
    for edit in history:
        outcome = {None: "replayed", True: f"took in {edit.steps} steps", False: f"FAILED after {edit.steps} steps"}
        target = repr(edit.target) if edit.target is not None else f"tokens {edit.target_tokens}"
        print(f"edit {edit.edit_id}: {target}, {outcome[edit.success]}, {edit.time}")
        for module, operation in edit.operations.items():
            radius = edit.radii[module]
            place = (f"entry {edit.entries[module]}, radius {radius:.4g}" if radius is not None else "entry removed")
            print(f"  {module + ': ' if several else ''}{operation} ({place})")
        if edit.prompt is not None:
            print(f"  prompt {edit.prompt!r} -> {edit.target_text!r}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from . import cli

    codebooks = _codebooks(args.adapter)
    removals = []
    for edit_id in args.edit_ids:
        held = {module: codebook for module, codebook in codebooks.items() if codebook.journal.positions_of(edit_id)}
        if not held:
            raise cli.CliError(f"edit {edit_id} is not in the journal of {args.adapter} (see: {cli.PROG} list "
                               f"{args.adapter}); nothing was written")
        removal = Removal(edit_id)
        for module, codebook in held.items():
            removal.extend(codebook.remove_edit(edit_id), prefix=f"{module}: " if len(codebooks) > 1 else "")
        removals.append(removal)
    _write(args.adapter, codebooks, args.output)
    for removal in removals:
        print(removal.summary())
    print(f"adapter saved to {args.output}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from . import cli

    first, second = _codebooks(args.first), _codebooks(args.second)
    if set(first) != set(second):
        raise cli.CliError(f"the adapters wrap different modules ({', '.join(sorted(first))} and "
                           f"{', '.join(sorted(second))}); merge adapters made for the same layers")
    configs = read_adapter_config(args.first), read_adapter_config(args.second)
    for name in ("base_model_name_or_path", "key", "key_module", "replacement"):
        values = [config.get(name) for config in configs]
        if values[0] != values[1] and not (name == "base_model_name_or_path" and None in values):
            raise cli.CliError(f"the adapters differ in {name} ({values[0]!r} and {values[1]!r}); merge adapters "
                               "made for the same base model with the same key")
    new_ids = merged_edit_ids(first, second)
    conflicts, added, joined = [], 0, 0
    try:
        for module, codebook in first.items():
            report = merge_codebook(codebook, second[module], new_ids, module if len(first) > 1 else "")
            conflicts += report.conflicts
            added, joined = added + report.added, joined + report.joined
    except ValueError as error:
        raise cli.CliError(str(error)) from None
    _write(args.first, first, args.output)
    print(f"merged {len(new_ids)} edits of {args.second} into {args.first}: {added} entries added, {joined} joined "
          f"an entry with the same target, {len(conflicts)} conflicts")
    for conflict in conflicts:
        print(f"  conflict: {conflict}")
    print(f"adapter saved to {args.output}")
    return 0


def run_trace(args: argparse.Namespace) -> int:
    from . import cli

    cli.read_adapter_config(args.adapter)  # fail before loading the model
    model, tokenizer = cli.load_model(args.model)
    peft_model = cli.load_adapter(model, args.adapter, is_trainable=False)
    cli.check_chat(args.chat, tokenizer, args.model)
    editor = GraceEditor(peft_model, tokenizer, progress=False, chat=args.chat)
    try:
        trace = editor.explain(args.prompt, neighbours=args.neighbours)
    except ValueError as error:
        raise cli.CliError(str(error)) from None
    answers = _answers(editor, args.prompt, args.max_new_tokens) if args.max_new_tokens else {}
    if args.json:
        print(json.dumps({**trace.to_dict(), "answers": answers}, indent=2, ensure_ascii=False))
        return 0
    print(f"prompt: {args.prompt!r}")
    for name, answer in answers.items():
        print(f"answer ({name}): {answer!r}")
    print(trace.summary())
    for module in trace.modules:
        for neighbour in module.neighbours:
            print(f"  {'*' if neighbour.fired else ' '} entry {neighbour.entry}: {neighbour.describe()}")
    return 0


def _answers(editor: GraceEditor, prompt: str, new_tokens: int) -> dict[str, str]:
    """Greedy answers to ``prompt`` with and without the adapter (none for a classifier)."""
    if editor.task is Task.SEQUENCE_CLASSIFICATION:
        return {}

    def answer() -> str:
        return greedy_answer(editor.model, editor.tokenizer, prompt, task=editor.task, chat=editor.chat,
                             max_new_tokens=new_tokens)

    edited = answer()
    with editor.model.disable_adapter():
        return {"edited": edited, "unedited": answer()}


def _codebooks(folder: str):
    from .cli import CliError

    try:
        return saved_codebooks(folder)
    except AdapterFileError as error:
        raise CliError(str(error)) from None


def _write(source: str, codebooks, output: str) -> None:
    from .cli import CliError

    try:
        write_adapter(source, codebooks, output)
    except (AdapterFileError, OSError) as error:
        raise CliError(f"cannot write the adapter to {output}: {error}") from None
