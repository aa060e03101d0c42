"""The edit console: a local web page to ask a GRACE-edited model, correct its answers, see which edit fired, take
edits back and save the adapter.

``grace-peft console MODEL [ADAPTER]`` starts it (see :mod:`grace_peft.apps.cli`); :func:`build_app` builds the same
page around a model already in memory, and :class:`Console` holds what its buttons do, on plain values (no web
framework needed to call or test them). The page is a `Gradio <https://www.gradio.app>`_ app, an optional
dependency: ``pip install "grace-peft[console]"``.

What the page does:

* **Ask**: the model's greedy answer to a prompt, and for every edited module which edit fired (the nearest key
  within its radius: its value replaced the layer's output) or that none did, with the distances and radii;
* **Correct**: an edit, ``GraceEditor.edit(prompt, corrected answer)``, then the prompt is asked again;
* **Undo**: ``GraceEditor.remove(edit_id)`` (what was restored and what a later edit had changed since), then the
  prompt is asked again;
* **Save**: ``model.save_pretrained(folder)``.

One model serves every browser tab, so actions run one at a time. Bad input (an empty prompt or answer, an edit id
the adapter does not hold, a folder that cannot be written) is reported on the page, never as a traceback.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..editing import GraceEditor
from ..inputs import Task
from ..inspection import Trace, greedy_answer

INSTALL_HINT = 'pip install "grace-peft[console]"'
DEFAULT_NEW_TOKENS = 20
DEFAULT_FOLDER = "grace-console-edits"
NEIGHBOURS = 3
EDIT_COLUMNS = ["edit id", "prompt", "target", "operations", "took", "steps"]


class ConsoleUnavailable(ImportError):
    """Gradio, which the console needs, is not installed."""


def import_gradio():
    """The ``gradio`` module, or :class:`ConsoleUnavailable` saying how to install it."""
    try:
        import gradio
    except ModuleNotFoundError as error:
        raise ConsoleUnavailable(f"The edit console needs gradio, which is not installed: {INSTALL_HINT}") from error
    return gradio


@dataclass
class Reply:
    """What an action shows: the ``answer`` and its ``trace`` (``None``: leave them as they are), a ``message`` for
    the status line (``error`` when the action was refused) and the ``edits`` table's rows (``None``: unchanged)."""

    answer: str | None
    trace: str | None
    message: str
    error: bool = False
    edits: list[list[Any]] | None = None


class Console:
    """The console's actions on plain values, one at a time (what the page's buttons call).

    Args:
        model: the PeftModel holding the GRACE adapter that ``editor`` edits.
        tokenizer: the base model's tokenizer.
        editor: the :class:`~grace_peft.GraceEditor` of ``model`` (its ``chat`` setting applies to answers too).
        adapter_folder: where **Save** writes by default.
        max_new_tokens: length of an answer.
    """

    def __init__(self, model: nn.Module, tokenizer, editor: GraceEditor, *, adapter_folder: str | None = None,
                 max_new_tokens: int = DEFAULT_NEW_TOKENS) -> None:
        if editor.task is Task.SEQUENCE_CLASSIFICATION:
            raise ValueError("The edit console shows generated answers: it needs a causal or seq2seq LM, not a "
                             "sequence classifier.")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        self.model = model
        self.tokenizer = tokenizer
        self.editor = editor
        self.adapter_folder = adapter_folder or DEFAULT_FOLDER
        self.max_new_tokens = max_new_tokens
        self._lock = threading.Lock()
        self._prompts: dict[int, str] = {}  # edits made here: their prompts, when the journal keeps no text

    # ------------------------------------------------------------------------------------------ actions
    def ask(self, prompt: str) -> Reply:
        """The greedy answer to ``prompt`` and which edit fired for it."""
        if not (prompt or "").strip():
            return Reply(None, None, "Type a prompt to ask the model.", error=True)
        with self._lock:
            answer, trace = self._answer(prompt)
        fired = [f"edit {edit_id}" for edit_id in dict.fromkeys(neighbour.edit_id for neighbour in trace.fired)]
        message = f"Answered; {' and '.join(fired)} fired." if fired else "Answered; no edit fired."
        return Reply(answer, trace.summary(), message)

    def correct(self, prompt: str, target: str, subject: str = "") -> Reply:
        """Edit the model so that it answers ``target`` to ``prompt``, then ask ``prompt`` again (``subject``: what
        the edit is about, needed when the adapter gates entries by subject)."""
        if not (prompt or "").strip():
            return Reply(None, None, "Type the prompt whose answer you correct.", error=True)
        if not (target or "").strip():
            return Reply(None, None, "Type the correct answer to edit the model with.", error=True)
        with self._lock:
            try:
                report = self.editor.edit(prompt, target, (subject or "").strip() or None)
            except ValueError as error:  # e.g. a prompt or target the tokenizer turns into nothing usable
                return Reply(None, None, f"Not edited: {error}", error=True)
            if report.skipped:
                message = f"Not edited: the model already answers {target!r} to this prompt."
            else:
                self._prompts[report.edit_id] = prompt
                operations = ", ".join(f"{op.value} at {name}" for name, op in report.operations.items())
                steps = _count(report.steps, "step")
                outcome = (f"took in {steps}" if report.success else
                           f"did NOT take within {steps} (the model does not predict it yet)")
                message = f"Edit {report.edit_id} {outcome} ({operations})."
            answer, trace = self._answer(prompt)
            return Reply(answer, trace.summary(), message, error=not report.skipped and not report.success,
                         edits=self._edit_rows())

    def undo(self, edit_id: str | int | None, prompt: str = "") -> Reply:
        """Take edit ``edit_id`` back; then ask ``prompt`` again when there is one."""
        text = str(edit_id if edit_id is not None else "").strip()
        try:
            number = int(text)
        except ValueError:
            with self._lock:
                held = self._held_ids()
            return Reply(None, None, f"Give the id of an edit to undo (a whole number; this adapter holds "
                                     f"{_ids(held)}), got {text!r}.", error=True)
        with self._lock:
            try:
                removal = self.editor.remove(number)
            except ValueError as error:
                return Reply(None, None, f"Nothing undone: {error}", error=True)
            self._prompts.pop(number, None)
            message = removal.summary()
            if (prompt or "").strip():
                answer, trace = self._answer(prompt)
                return Reply(answer, trace.summary(), message, edits=self._edit_rows())
            return Reply(None, None, message, edits=self._edit_rows())

    def save(self, folder: str) -> Reply:
        """Save the adapter to ``folder`` (``model.save_pretrained``)."""
        folder = (folder or "").strip()
        if not folder:
            return Reply(None, None, "Type the folder to save the adapter to.", error=True)
        with self._lock:
            try:
                self.model.save_pretrained(folder)
            except (OSError, ValueError) as error:
                return Reply(None, None, f"Not saved: {error}", error=True)
            keys, edits = self.editor.num_keys(), len(self._held_ids())
        return Reply(None, None, f"Adapter saved to {os.path.abspath(folder)} ({_count(edits, 'edit')}, "
                                 f"{_count(keys, 'codebook key')}).")

    def edit_rows(self) -> list[list[Any]]:
        """The edits the adapter holds, oldest first, as rows of :data:`EDIT_COLUMNS`."""
        with self._lock:
            return self._edit_rows()

    def header(self) -> str:
        """One line on the model and where it is edited."""
        config = self.editor.config
        base = getattr(self.model, "get_base_model", lambda: self.model)()
        name = getattr(getattr(base, "config", None), "name_or_path", "") or type(base).__name__
        if os.path.isdir(name):  # a local checkpoint: its folder's name, not where it lies
            name = os.path.basename(os.path.normpath(name))
        header = (f"**{name}**, GRACE at {', '.join(f'`{module}`' for module in self.editor.layers)} "
                  f"(key {config.key}, eps_init {config.eps_init:g})")
        if not config.journal_limit:
            header += "; no journal (`journal_limit=0`): edits are not listed and cannot be undone"
        return header

    # ------------------------------------------------------------------------------------------ helpers
    def _answer(self, prompt: str) -> tuple[str, Trace]:
        """The greedy answer to ``prompt``, and which edit fired for it."""
        answer = greedy_answer(self.model, self.tokenizer, prompt, task=self.editor.task, chat=self.editor.chat,
                               max_new_tokens=self.max_new_tokens)
        return answer, self.editor.explain(prompt, neighbours=NEIGHBOURS)

    def _held_ids(self) -> list[int]:
        return [edit.edit_id for edit in self.editor.history()]

    def _edit_rows(self) -> list[list[Any]]:
        rows = []
        for edit in self.editor.history():
            prompt = edit.prompt if edit.prompt is not None else self._prompts.get(edit.edit_id, "")
            target = edit.target_text if edit.target_text is not None else (edit.target or "")
            operations = ", ".join(f"{op} at {module}" if len(edit.operations) > 1 else op
                                   for module, op in edit.operations.items())
            took = "?" if edit.success is None else ("yes" if edit.success else "no")
            rows.append([edit.edit_id, prompt, target, operations, took, "" if edit.steps is None else edit.steps])
        return rows


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _ids(ids: list[int]) -> str:
    if not ids:
        return "no edits"
    shown = ", ".join(map(str, ids[-10:]))
    return f"edits {shown}" if len(ids) <= 10 else f"{len(ids)} edits, the latest {shown}"


# ---------------------------------------------------------------------------------------------- the page
def build_app(model: nn.Module, tokenizer, editor: GraceEditor, *, adapter_folder: str | None = None,
              max_new_tokens: int = DEFAULT_NEW_TOKENS):
    """The console as a ``gradio.Blocks`` app (not launched: ``app.launch()``, or :func:`serve`).

    Raises :class:`ConsoleUnavailable` when gradio is not installed."""
    gr = import_gradio()
    console = Console(model, tokenizer, editor, adapter_folder=adapter_folder, max_new_tokens=max_new_tokens)

    def show(reply: Reply, *, with_edits: bool = True) -> tuple:
        keep = gr.skip()
        message = f"**Error:** {reply.message}" if reply.error else reply.message
        shown = (keep if reply.answer is None else reply.answer, keep if reply.trace is None else reply.trace,
                 message)
        if with_edits:
            shown += (keep if reply.edits is None else reply.edits,)
        return shown

    def action(method: Callable[..., Reply], *, with_edits: bool = True) -> Callable[..., tuple]:
        def run(*values):
            try:
                return show(method(*values), with_edits=with_edits)
            except Exception as error:  # a failure inside the model: say so on the page, keep the server up
                return show(Reply(None, None, f"{type(error).__name__}: {error}", error=True), with_edits=with_edits)

        return run

    with gr.Blocks(title="GRACE edit console", analytics_enabled=False) as app:
        gr.Markdown(f"## GRACE edit console\n{console.header()}", elem_id="header")
        with gr.Row(equal_height=True):
            prompt = gr.Textbox(label="Prompt", placeholder="Ask the model something", scale=5, elem_id="prompt")
            ask = gr.Button("Ask", variant="primary", scale=1, elem_id="ask")
        answer = gr.Textbox(label="Answer (greedy)", interactive=False, elem_id="answer")
        trace = gr.Textbox(label="Which edit fired, per edited module", interactive=False, lines=2,
                           elem_id="trace")
        with gr.Row(equal_height=True):
            target = gr.Textbox(label="Correct answer", placeholder="What the model should answer to the prompt",
                                scale=5, elem_id="target")
            subject = gr.Textbox(label="Subject (as the prompt spells it)", scale=2, elem_id="subject",
                                 visible=bool(editor.config.subject_gate),
                                 placeholder="What the edit is about: it fires only on prompts that contain it")
            correct = gr.Button("Correct (edit)", variant="primary", scale=1, elem_id="correct")
        message = gr.Markdown(elem_id="message")
        edits = gr.Dataframe(value=console.edit_rows(), headers=EDIT_COLUMNS, label="Edits in the adapter",
                             interactive=False, wrap=True, elem_id="edits")
        with gr.Row(equal_height=True):
            edit_id = gr.Textbox(label="Edit id", placeholder="e.g. 0", scale=1, elem_id="edit-id")
            undo = gr.Button("Undo edit", scale=1, elem_id="undo")
            folder = gr.Textbox(label="Adapter folder", value=console.adapter_folder, scale=3, elem_id="folder")
            save = gr.Button("Save adapter", scale=1, elem_id="save")

        shown = [answer, trace, message]
        ask_action = action(console.ask, with_edits=False)
        ask.click(ask_action, [prompt], shown)
        prompt.submit(ask_action, [prompt], shown)
        correct_action = action(console.correct)
        correct.click(correct_action, [prompt, target, subject], [*shown, edits])
        target.submit(correct_action, [prompt, target, subject], [*shown, edits])
        undo.click(action(console.undo), [edit_id, prompt], [*shown, edits])
        save.click(action(console.save, with_edits=False), [folder], shown)
        def pick(selected) -> str:  # a click on a row of the table fills in its edit id
            row = getattr(selected, "row_value", None)
            return str(row[0]) if row else ""

        pick.__annotations__ = {"selected": gr.SelectData, "return": str}  # gradio passes the click by this type
        edits.select(pick, None, edit_id)
        app.load(console.edit_rows, None, edits)  # a new tab sees the edits made since the page was built
    return app


def serve(model: nn.Module, tokenizer, editor: GraceEditor, *, adapter_folder: str | None = None,
          max_new_tokens: int = DEFAULT_NEW_TOKENS, host: str = "127.0.0.1", port: int | None = None,
          open_browser: bool = False) -> None:
    """Build the console and serve it until interrupted (Ctrl-C). Nothing is sent outside this machine: no share
    link, no usage analytics."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app(model, tokenizer, editor, adapter_folder=adapter_folder, max_new_tokens=max_new_tokens)
    try:
        app.launch(server_name=host, server_port=port, inbrowser=open_browser, share=False, ssr_mode=False,
                   quiet=True, prevent_thread_lock=True)
        print(f"GRACE edit console on {app.local_url} (Ctrl-C to stop)", flush=True)
        app.block_thread()  # until Ctrl-C
    except KeyboardInterrupt:  # Ctrl-C while the server was starting
        print("stopped", flush=True)
    finally:
        app.close()
