"""The edit loop (spec §3): one edit = probe, codebook update, train only the retrieved value, verify.

:class:`GraceEditor` turns ``(prompt, target)`` pairs into edits of a GRACE-wrapped model:

1. probe: a forward pass (no gradient) records, at every GRACE layer of the adapter, the query (the key of the
   layer's input, or of its key module's) and the layer's current output at the query token; it also tells whether
   the target is already predicted;
2. update: each layer's codebook applies ADD / EXPAND / SPLIT / OVERWRITE with the edit's exact target token ids;
3. train: only the value chosen by the update is trained (``GraceConfig.optimizer``: Adam or the line search of
   :mod:`grace_peft.optimizers`) on the model's own loss with the target labelled, until the target is predicted
   (or another early-stop rule) and at most ``max_steps`` steps; the blocks below the edited layer are replayed
   from the probe's forward; with ``value_contexts``, on the edit prompt and on the prompt after each of that many
   model-written texts at once (mean loss; done when every one of them predicts the target);
4. verify: whether the edit took as inference sees it. When the codebook retrieves the trained entry for the
   edit's own query, the training forward that stopped is that check; otherwise a normal inference pass decides.

An edit that raises (or is interrupted) leaves the codebooks exactly as they were before it. Several edits can go
through these steps together (:meth:`GraceEditor.edit_many` with ``batch_size``), each row with its own value,
optimizer and early stop.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .background import background_texts
from .codebook import CodebookOperation, Removal
from .config import GraceConfig
from .frozen_prefix import Replay, blocks_below, replay_frozen_blocks
from .inputs import (
    Edit,
    EditLike,
    EncodedEdit,
    Task,
    as_edit,
    collate,
    detect_task,
    encode_edit,
    input_device,
    max_input_length,
    pad_token_id,
    per_row_loss,
    target_predicted,
    transformers_model,
)
from .inspection import HistoryEdit, Trace, edit_history, explain
from .model import grace_layers
from .optimizers import LineSearch
from .query import QUERY_POSITIONS_KWARG, label_query_positions

if TYPE_CHECKING:
    from accelerate import Accelerator

CONTEXT_TOKENS = 10  # length of a model-written context (GraceConfig.value_contexts), as ROME's context templates


class EditsPartlyApplied(RuntimeError):
    """``edit_many`` failed at edit ``failed_index``: ``reports`` are those of the edits before it, which were applied
    and stay applied (the failed batch left the codebooks as they were). The cause is the original error."""

    def __init__(self, reports: list[EditReport], failed_index: int) -> None:
        super().__init__(f"Edit {failed_index} of the stream failed; the {len(reports)} edits before it were applied "
                         "(their reports are in .reports); the cause is below.")
        self.reports = reports
        self.failed_index = failed_index


@dataclass
class EditReport:
    """What one edit did. ``operations`` maps each wrapped module to its codebook operation (empty if skipped).
    ``seconds`` is the edit's wall time (its share of its batch's), ``phase_seconds`` how it splits into ``probe``,
    ``update`` (the codebook rules), ``train`` and ``verify``."""

    prompt: str
    target: str | int
    edit_id: int | None
    skipped: bool
    operations: dict[str, CodebookOperation] = field(default_factory=dict)
    steps: int = 0
    loss: float = float("nan")
    success: bool = False
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def operation(self) -> CodebookOperation | None:
        """The codebook operation when exactly one module is wrapped (the usual case)."""
        return next(iter(self.operations.values())) if len(self.operations) == 1 else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["operations"] = {name: op.value for name, op in self.operations.items()}
        return data


@dataclass
class _RowPlan:
    """What the codebook update decided for one row of a batch: its edit id, and per layer the operation and the
    entry whose value is trained (a trainable copy of it)."""

    edit_id: int
    operations: dict[str, CodebookOperation]
    values: dict[str, tuple[int, torch.Tensor]]


class GraceEditor:
    """Applies edits to a model wrapped with a GRACE adapter (``get_peft_model(base, GraceConfig(...))``).

    Args:
        model: the PeftModel (or a transformers model with a GRACE adapter injected).
        tokenizer: the base model's tokenizer.
        adapter_name: the adapter to edit (default: the active one).
        task: override the detected task (``"causal_lm"``, ``"seq2seq_lm"``, ``"sequence_classification"``).
        progress: show a progress bar in :meth:`edit_many`.
        reuse_frozen_layers: compute the blocks below the edited layer once per edit and replay their output in
            every training step (bit-identical activations, much faster when the edited layer is high up).
        chat: render each prompt with the tokenizer's chat template as a user turn; the target is the assistant's
            answer (for chat/instruct models: edit what they answer in a conversation).
        accelerator: an ``accelerate.Accelerator`` whose mixed precision (bf16/fp16) the probe, training and verify
            passes run under (``accelerator.autocast()``; with fp16, its gradient scaler scales the loss). Codebook
            keys, values and distances stay float32.

    Edits run in one process: a model wrapped in DDP or FSDP is refused (every edit changes the codebook that the
    next edit reads, so edits cannot be split across processes; see :mod:`grace_peft.evaluation.distributed` for
    evaluation).
    """

    def __init__(self, model: nn.Module, tokenizer, *, adapter_name: str | None = None,
                 task: Task | str | None = None, progress: bool = True, reuse_frozen_layers: bool = True,
                 chat: bool = False, accelerator: Accelerator | None = None) -> None:
        _check_not_data_parallel(model)
        self.model = model
        self.tokenizer = tokenizer
        self.adapter_name = adapter_name or _single_active_adapter(model)
        self.task = Task(task) if task is not None else detect_task(model)
        self.progress = progress
        self.chat = chat
        self.accelerator = accelerator
        self.layers = grace_layers(model, self.adapter_name)
        if not self.layers:
            raise ValueError(
                f"No GRACE adapter named '{self.adapter_name}' in this model. Wrap the model first: "
                "get_peft_model(model, GraceConfig(target_modules=[...])), after `import grace_peft`."
            )
        forward = getattr(transformers_model(model), "forward", None)
        self._keeps_logits = forward is not None and "logits_to_keep" in inspect.signature(forward).parameters
        self._call_state = next(iter(self.layers.values())).call_state
        self.frozen_blocks = blocks_below(transformers_model(model), list(self.layers)) if reuse_frozen_layers \
            else []
        self._context_texts: dict[tuple[int, int], list[str]] = {}
        if self.config.value_contexts and self.task is Task.SEQUENCE_CLASSIFICATION:
            raise ValueError("GraceConfig.value_contexts trains values after text the model writes itself, and a "
                             "sequence classifier writes none: set value_contexts=0 for it.")

    @property
    def config(self) -> GraceConfig:
        return self.model.peft_config[self.adapter_name]

    # ------------------------------------------------------------------------------------------ public API
    def edit(self, prompt: str, target: str | int, subject: str | None = None) -> EditReport:
        """Apply one edit and report what happened (``subject``: what it is about, as the prompt spells it; needed
        with ``GraceConfig.subject_gate``)."""
        edit = Edit(prompt, target, subject)
        return self._apply_rows([self._encode(edit)], [edit])[0]

    def edit_many(self, edits_in: Iterable[EditLike], *, batch_size: int = 1,
                  progress: bool | None = None) -> list[EditReport]:
        """Apply a stream of edits in order (each sees the codebook left by the ones before it).

        ``batch_size=k`` trains up to k edits at once: one probe pass for the batch, the codebook updated row by
        row in order, then every row's value trained by its own Adam on its own loss (so a row's value follows the
        same steps as when edited alone) until that row is predicted. A row whose query reaches a key created or
        changed earlier in the same batch would see a different codebook than one-at-a-time editing gives it; the
        batch stops before that row, which starts the next batch. The codebook then has the same entries, labels,
        radii and edit ids as one-at-a-time editing; keys and values agree up to float rounding of padded batches.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        edits, encoded = [], []
        for index, item in enumerate(edits_in):
            try:
                edits.append(as_edit(item))
                encoded.append(self._encode(edits[-1]))
            except ValueError as error:  # the whole stream is checked before the first edit
                raise ValueError(f"Edit {index} of the stream: {error} No edit was applied.") from None
        show = self.progress if progress is None else progress
        reports: list[EditReport] = []
        with tqdm(total=len(edits), desc="GRACE edits", unit="edit", disable=not show) as bar:
            while len(reports) < len(edits):
                start = len(reports)
                try:
                    done = self._apply_rows(encoded[start:start + batch_size], edits[start:start + batch_size])
                except Exception as error:
                    raise EditsPartlyApplied(reports, start) from error
                reports.extend(done)
                bar.update(len(done))
                bar.set_postfix(keys=self.num_keys(), ok=sum(r.success for r in reports))
        return reports

    def _encode(self, edit: Edit) -> EncodedEdit:
        """Tokenize an edit, refusing one longer than the model takes."""
        if self.config.subject_gate and not edit.subject:
            raise ValueError(f"GraceConfig.subject_gate gates every entry by its edit's subject, and the edit "
                             f"{edit.prompt[:60]!r} names none: pass Edit(prompt, target, subject=...).")
        encoded = encode_edit(self.tokenizer, self.task, edit.prompt, edit.target, chat=self.chat,
                              subject=edit.subject if self.config.subject_gate else None)
        length, limit = encoded.inputs["input_ids"].shape[1], max_input_length(self.model)
        if limit is not None and length > limit:
            what = "prompt and target" if self.task is Task.CAUSAL_LM else "prompt"
            raise ValueError(f"The edit {edit.prompt[:60]!r} is {length} tokens long ({what}), but the model takes at "
                             f"most {limit}: shorten it.")
        return encoded

    def explain(self, prompt: str, *, neighbours: int = 3) -> Trace:
        """Why the model answers ``prompt`` as it does: per wrapped module, the ``neighbours`` nearest codebook
        entries (edit id, distance, radius, target) and the one that fired, if any (see
        :func:`grace_peft.inspection.explain`)."""
        return explain(self.model, self.tokenizer, prompt, adapter_name=self.adapter_name, task=self.task,
                       chat=self.chat, neighbours=neighbours)

    def history(self) -> list[HistoryEdit]:
        """The edits this adapter's journal holds, oldest first (id, operations, entries, radii, target; the text
        when ``GraceConfig.journal_text`` kept it)."""
        codebooks = {name: layer.grace_codebook[self.adapter_name] for name, layer in self.layers.items()}
        return edit_history(codebooks, None if self.task is Task.SEQUENCE_CLASSIFICATION else self.tokenizer)

    def remove(self, edit_id: int) -> Removal:
        """Take edit ``edit_id`` back: every codebook goes back to its state before that edit for everything the edit
        created or changed, except what a later edit changed since (the :class:`~grace_peft.codebook.Removal` lists
        what was restored and what was not). When no later edit touched the same entries, the codebooks equal those
        of the same edits without this one. Raises ``ValueError`` for an id the journal does not hold."""
        removal = Removal(edit_id)
        held = [(name, codebook) for name, codebook in zip(self.layers, self._codebooks(), strict=True)
                if codebook.journal.positions_of(edit_id)]
        if not held:
            known = sorted({edit.edit_id for edit in self.history()})
            shown = ", ".join(map(str, known[-10:])) or "none"
            raise ValueError(f"Edit {edit_id} is not in this adapter's journal (its latest edit ids: {shown}). It was "
                             "never made, was taken back already, or is older than GraceConfig.journal_limit keeps.")
        with _codebooks_restored_on_error([codebook for _, codebook in held]):
            for name, codebook in held:
                removal.extend(codebook.remove_edit(edit_id), prefix=f"{name}: " if len(self.layers) > 1 else "")
        return removal

    def num_keys(self) -> int:
        """Codebook entries of the edited adapter, over all wrapped modules."""
        return sum(len(layer.grace_codebook[self.adapter_name]) for layer in self.layers.values())

    @property
    def value_contexts(self) -> list[str]:
        """The texts each value is also trained after (``GraceConfig.value_contexts`` of them): the model's own
        writing from generic openings, seeded by ``GraceConfig.seed``, written once per editor."""
        count, seed = self.config.value_contexts, self.config.seed
        if count and (count, seed) not in self._context_texts:
            self._context_texts[count, seed] = background_texts(self.model, self.tokenizer, count, seed=seed,
                                                                max_new_tokens=CONTEXT_TOKENS, progress=False)
        return self._context_texts.get((count, seed), [])

    def apply(self, encoded: EncodedEdit, *, prompt: str = "", target: str | int = "") -> EditReport:
        """Apply one already-tokenized edit."""
        if self.config.subject_gate and encoded.gates is None:
            raise ValueError("GraceConfig.subject_gate needs the edit's subject: encode it with "
                             "encode_edit(..., subject=...), or use edit(prompt, target, subject).")
        return self._apply_rows([encoded], [Edit(prompt, target)])[0]

    # ------------------------------------------------------------------------------------------ steps
    def _apply_rows(self, encoded: list[EncodedEdit], edits: list[Edit]) -> list[EditReport]:
        """Edit a batch of rows; returns the reports of the leading rows applied (at least one)."""
        started = time.perf_counter()
        clock = _PhaseClock()
        # Without contexts the values train on the probe's own rows: the frozen blocks' outputs recorded in the probe
        # are replayed in every training step (a contexts batch has other rows: training records its own).
        reuse_probe = not self.config.value_contexts
        with _eval_mode(self.model), _codebooks_restored_on_error(self._codebooks()):
            with replay_frozen_blocks(self.frozen_blocks if reuse_probe else []) as replay:
                with clock("probe"):
                    inputs = self._batch([item.inputs for item in encoded])
                    probes, predicted = self._probe(inputs)
                with clock("update"):
                    plans = self._update_codebooks(encoded, edits, probes, predicted)
                trained = [row for row, plan in enumerate(plans) if plan is not None]
                steps = [0] * len(plans)
                if trained:
                    with clock("train"):
                        batch = inputs
                        if trained != list(range(len(encoded))):
                            rows = torch.tensor(trained)
                            batch = {name: tensor[rows.to(tensor.device)] for name, tensor in inputs.items()}
                            replay.keep_rows(rows, len(encoded))
                        training, variants = self._training_batch(batch, [encoded[row] for row in trained],
                                                                  [edits[row] for row in trained])
                        values = {name: [plans[row].values[name][1] for row in trained] for name in self.layers}
                        counts, outcomes = self._train(training, values, variants, replay if reuse_probe else None)
                        for row, count in zip(trained, counts, strict=True):
                            steps[row] = count
                        for row in trained:
                            for name, (index, value) in plans[row].values.items():
                                self.layers[name].grace_codebook[self.adapter_name].set_value(index, value)
            if trained:
                with clock("verify"):
                    losses, successes = self._verified(batch, [plans[row] for row in trained],
                                                       [{name: probes[name][0][row] for name in self.layers}
                                                        for row in trained], outcomes,
                                                       [encoded[row] for row in trained])
            seconds = (time.perf_counter() - started) / len(plans)
            for position, row in enumerate(trained):
                for codebook in self._codebooks():
                    codebook.journal.set_outcome(plans[row].edit_id, steps=steps[row], success=successes[position],
                                                 seconds=seconds, loss=losses[position])
        phases = {phase: elapsed / len(plans) for phase, elapsed in clock.seconds.items()}
        reports = []
        for row, (plan, edit) in enumerate(zip(plans, edits, strict=False)):
            if plan is None:
                reports.append(EditReport(edit.prompt, edit.target, None, skipped=True, success=True, seconds=seconds,
                                          phase_seconds=phases))
                continue
            position = trained.index(row)
            reports.append(EditReport(edit.prompt, edit.target, plan.edit_id, skipped=False,
                                      operations=plan.operations, steps=steps[row], loss=losses[position],
                                      success=successes[position], seconds=seconds, phase_seconds=phases))
        return reports

    def _update_codebooks(self, encoded: list[EncodedEdit], edits: list[Edit], probes,
                          predicted: list[bool]) -> list[_RowPlan | None]:
        """Update the codebooks row by row, in order; per row, its plan, or None when skipped (already correct).

        Stops before the first row whose query reaches an entry that an earlier row of this batch created or
        changed (that row goes to the next batch)."""
        plans: list[_RowPlan | None] = []
        touched: dict[str, set[int]] = {name: set() for name in self.layers}
        for row, item in enumerate(encoded):
            if row > 0 and self._reaches_touched(probes, row, item, touched):
                break
            if self.config.skip_if_correct and predicted[row]:
                plans.append(None)
                continue
            edit_id = max(int(codebook.next_edit_id) for codebook in self._codebooks())
            plan = _RowPlan(edit_id, {}, {})
            text = {"prompt": edits[row].prompt, "target": edits[row].target} if self.config.journal_text else None
            if text is not None and edits[row].subject:
                text["subject"] = edits[row].subject
            for name, layer in self.layers.items():
                query, current = probes[name]
                codebook = layer.grace_codebook[self.adapter_name]
                update = codebook.update(query[row], item.label_ids, edit_id=edit_id,
                                         init_value=self._initial_value(current[row], edit_id, name), text=text,
                                         gates=item.gates, allowed=_allowed(codebook, item))
                touched[name].add(update.index)
                if update.operation is CodebookOperation.SPLIT:
                    touched[name].add(update.nearest)
                plan.operations[name] = update.operation
                plan.values[name] = (update.index,
                                     codebook.values[update.index].detach().clone().requires_grad_(True))
            plans.append(plan)
        return plans

    def _reaches_touched(self, probes, row: int, item: EncodedEdit, touched: dict[str, set[int]]) -> bool:
        for name, layer in self.layers.items():
            codebook = layer.grace_codebook[self.adapter_name]
            if not touched[name] or len(codebook) == 0:
                continue
            index, distance = codebook.nearest(probes[name][0][row], _allowed(codebook, item))
            if int(index) in touched[name] and codebook.reaches(int(index), float(distance)):
                return True
        return False

    @torch.no_grad()
    def _probe(self, inputs: dict[str, torch.Tensor]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]],
                                                                list[bool]]:
        """One forward pass: per layer the queries and the layer's own output there, and per row whether the target
        is already predicted (logits only from the query on, as in training)."""
        batch, labels = self._training_inputs(inputs)
        with self._call_state.recording_queries() as recorded, self._autocast():
            logits = self.model(**batch).logits
        probes = {name: recorded.get((layer, self.adapter_name)) for name, layer in self.layers.items()}
        missing = [name for name, probe in probes.items() if probe is None]
        if missing:
            raise RuntimeError(f"GRACE layers {missing} did not run in the forward pass; is the adapter active?")
        for name, (query, _) in probes.items():
            if not torch.isfinite(query).all():
                raise ValueError(f"The input of '{name}' contains NaN or inf for this edit; the model's forward pass "
                                 "is numerically broken before the edited layer (check its dtype and weights).")
        return probes, target_predicted(self.task, logits, labels).tolist()

    def _training_batch(self, batch: dict[str, torch.Tensor], encoded: list[EncodedEdit],
                        edits: list[Edit]) -> tuple[dict[str, torch.Tensor], int]:
        """The rows the values are trained on and how many belong to each edit: ``batch`` itself, or with
        ``value_contexts`` each edit's prompt followed by its prompt after every context (edit after edit)."""
        contexts = self.value_contexts
        if not contexts:
            return batch, 1
        rows = []
        for item, edit in zip(encoded, edits, strict=True):
            if not edit.prompt:
                raise ValueError("GraceConfig.value_contexts trains values on the prompt after other texts, so it "
                                 "needs the prompt's text: use edit()/edit_many(), or pass prompt= to apply().")
            rows += [item.inputs, *(self._encode(Edit(f"{context} {edit.prompt}", edit.target, edit.subject)).inputs
                                    for context in contexts)]
        return self._batch(rows), 1 + len(contexts)

    def _train(self, inputs: dict[str, torch.Tensor], values: dict[str, list[torch.Tensor]], variants: int = 1,
               replay: Replay | None = None) -> tuple[list[int], list[tuple[float, bool] | None]]:
        """Train each edit's values (one optimizer per edit, on the mean loss of that edit's ``variants`` consecutive
        rows) until the edit is done or ``max_steps``. An edit that is done leaves the batch, so a batch never costs
        more steps than its edits trained one at a time. Returns the steps each edit took and, for an edit that finished
        by the early-stop rule, the loss and whether the target is predicted on its own prompt in the forward pass
        that found it done (with its final value; None for an edit stopped by ``max_steps``). ``replay`` already
        holds the frozen blocks' outputs for ``inputs`` (the probe's); else training records its own."""
        config = self.config
        edits = len(inputs["labels"]) // variants
        optimizers = [self._optimizer([values[name][edit] for name in values]) for edit in range(edits)]
        line_search = config.optimizer == "line_search"
        steps = [0] * edits
        outcomes: list[tuple[float, bool] | None] = [None] * edits
        active = list(range(edits))  # edits still training, in batch order
        scaler = getattr(self.accelerator, "scaler", None)  # fp16 only
        recorded = nullcontext(replay) if replay is not None else replay_frozen_blocks(self.frozen_blocks)
        with torch.enable_grad(), recorded as replay:
            batch, labels = self._training_inputs(inputs)
            for _ in range(config.max_steps):
                forced = {(self.layers[name], self.adapter_name):
                          torch.stack([edit_values[edit] for edit in active]).repeat_interleave(variants, 0)
                          for name, edit_values in values.items()}
                with self._call_state.forcing_values(forced), self._autocast():
                    logits = self.model(**batch).logits
                losses = per_row_loss(self.task, logits, labels).view(len(active), variants).mean(1)
                if not torch.isfinite(losses).all():
                    raise FloatingPointError(f"An edit's loss became {losses.tolist()} after {max(steps)} steps; "
                                             "lower GraceConfig.learning_rate.")
                finished = self._done(logits, losses, labels, variants)
                if any(finished):
                    own = torch.arange(len(active), device=logits.device) * variants  # each edit's own prompt row
                    own_losses = per_row_loss(self.task, logits[own], labels[own.to(labels.device)]).tolist()
                    predicted = target_predicted(self.task, logits[own], labels[own.to(labels.device)]).tolist()
                    for position, done in enumerate(finished):
                        if done:
                            outcomes[active[position]] = (own_losses[position], predicted[position])
                if all(finished):
                    break
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                loss = losses.sum()  # each value only gets its own edit's gradient
                scaled = scaler is not None and not line_search  # a line search normalizes the gradient itself
                (scaler.scale(loss) if scaled else loss).backward()
                values_of_losses = losses.detach().tolist()
                for position, (edit, done) in enumerate(zip(active, finished, strict=True)):
                    if not done:
                        if line_search:
                            optimizers[edit].step(values_of_losses[position])
                        elif scaled:
                            scaler.step(optimizers[edit])  # unscales; skips the step if the gradient overflowed
                        else:
                            optimizers[edit].step()
                        steps[edit] += 1
                if scaled:
                    scaler.update()
                if any(finished):
                    kept = [position for position, done in enumerate(finished) if not done]
                    active = [active[position] for position in kept]
                    rows = torch.tensor([position * variants + variant for position in kept
                                         for variant in range(variants)])
                    inputs = {name: tensor[rows.to(tensor.device)] for name, tensor in inputs.items()}
                    replay.keep_rows(rows, len(finished) * variants)
                    batch, labels = self._training_inputs(inputs)
        return steps, outcomes

    def _optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer | LineSearch:
        if self.config.optimizer == "line_search":
            return LineSearch(params, self.config.line_search_step)
        return torch.optim.Adam(params, lr=self.config.learning_rate)

    def _training_inputs(self, inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The training forward's inputs and the labels its logits are scored against.

        A causal LM whose forward takes ``logits_to_keep`` computes logits only from the earliest query to the end
        (the output layer over the vocabulary is the most expensive part of a step at an upper layer). Its own loss
        would then see mismatched shapes, so the labels stay here and the query positions they imply are passed
        explicitly."""
        labels = inputs["labels"]
        if self.task is not Task.CAUSAL_LM or not self._keeps_logits:
            return inputs, labels
        length = labels.shape[1]
        positions = label_query_positions(labels, torch.full((len(labels),), length - 1, device=labels.device))
        keep = length - int(positions.min())
        trimmed = {name: value for name, value in inputs.items() if name != "labels"}
        trimmed.update({QUERY_POSITIONS_KWARG: positions, "logits_to_keep": keep})
        return trimmed, labels[:, length - keep:]

    def _done(self, logits: torch.Tensor, losses: torch.Tensor, labels: torch.Tensor, variants: int) -> list[bool]:
        rule = self.config.early_stop
        if rule == "predicted":
            return target_predicted(self.task, logits, labels).view(-1, variants).all(1).tolist()
        if rule == "loss":
            return (losses.detach() < self.config.stop_loss).tolist()
        return [False] * len(losses)

    def _verified(self, batch: dict[str, torch.Tensor], plans: list[_RowPlan], queries: list[dict[str, torch.Tensor]],
                  outcomes: list[tuple[float, bool] | None],
                  encoded: list[EncodedEdit]) -> tuple[list[float], list[bool]]:
        """Each trained edit's loss and success as inference sees them. The forward pass that stopped an edit's
        training already shows them, when inference would use the value it trained: every layer's codebook
        retrieves, for the edit's own query, the entry that was trained (inference then replaces the same output
        with the same value, and the frozen blocks below are bit-identical). Otherwise (stopped by ``max_steps``, or
        another entry is nearer) a full inference pass decides."""
        codebooks = {name: layer.grace_codebook[self.adapter_name] for name, layer in self.layers.items()}
        retrieved = all(
            outcome is not None and all(
                int(codebook.lookup(query[name], _allowed(codebook, item))[0]) == plan.values[name][0]
                for name, codebook in codebooks.items())
            for plan, query, outcome, item in zip(plans, queries, outcomes, encoded, strict=True))
        if retrieved:
            return [loss for loss, _ in outcomes], [predicted for _, predicted in outcomes]
        return self._verify(batch)

    @torch.no_grad()
    def _verify(self, inputs: dict[str, torch.Tensor]) -> tuple[list[float], list[bool]]:
        with self._autocast():
            logits = self.model(**inputs).logits
        losses = per_row_loss(self.task, logits, inputs["labels"])
        return losses.tolist(), target_predicted(self.task, logits, inputs["labels"]).tolist()

    def _batch(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = collate(rows, self.task, pad_token_id(self.tokenizer))
        device = input_device(self.model)
        return {name: tensor.to(device) for name, tensor in batch.items()}

    def _initial_value(self, current_output: torch.Tensor, edit_id: int, layer_name: str) -> torch.Tensor:
        if self.config.value_init == "warm":
            return current_output
        # Cold start: a random direction with the scale of the layer's output, from a private generator.
        layer_index = sorted(self.layers).index(layer_name)
        generator = torch.Generator().manual_seed(hash((self.config.seed, edit_id, layer_index)) % (2**63))
        noise = torch.randn(current_output.shape, generator=generator)
        return noise.to(current_output.device) * current_output.pow(2).mean().sqrt()

    def _autocast(self) -> AbstractContextManager:
        return self.accelerator.autocast() if self.accelerator is not None else nullcontext()

    def _codebooks(self):
        return [layer.grace_codebook[self.adapter_name] for layer in self.layers.values()]


def _allowed(codebook, item: EncodedEdit) -> torch.Tensor | None:
    """The entries an edit's own prompt may retrieve (None: all; see ``Codebook.gate_mask``)."""
    mask = codebook.gate_mask([item.prompt_ids])
    return None if mask is None else mask[0]


class _PhaseClock:
    """Wall time per named phase: ``with clock("train"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - started


def _single_active_adapter(model: nn.Module) -> str:
    active = getattr(model, "active_adapter", "default")
    if isinstance(active, (list, tuple)):
        if len(active) != 1:
            raise ValueError(f"Several adapters are active ({active}); pass adapter_name= to choose the one to edit.")
        return active[0]
    return active


def _check_not_data_parallel(model: nn.Module) -> None:
    """Refuse DDP / FSDP wrappers: GRACE edits are sequential and run in one process on the whole model."""
    if not torch.distributed.is_available():
        return
    from torch.distributed import fsdp

    wrappers = (nn.parallel.DistributedDataParallel, fsdp.FullyShardedDataParallel, getattr(fsdp, "FSDPModule", ()))
    wrapped = next((type(module).__name__ for module in model.modules() if isinstance(module, wrappers)), None)
    if wrapped is not None:
        raise ValueError(
            f"GraceEditor cannot edit a model wrapped in {wrapped}. Every edit changes the codebook that the next "
            "edit reads, so edits run one after another in one process, on a model that holds its full weights "
            "(device_map may spread it over several GPUs). Edit the unwrapped model in one process, save_pretrained "
            "the adapter, and load it in every process to evaluate "
            "(grace_peft.evaluation.distributed.evaluate_data_parallel)."
        )


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Edit in eval mode (no dropout), then restore every module's own training flag."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def _codebooks_restored_on_error(codebooks: list[nn.Module]) -> Iterator[None]:
    snapshots = [{name: tensor.detach().clone() for name, tensor in codebook.state_dict().items()}
                 for codebook in codebooks]
    try:
        yield
    except BaseException:
        for codebook, snapshot in zip(codebooks, snapshots, strict=True):
            codebook.load_state_dict(snapshot)
        raise
