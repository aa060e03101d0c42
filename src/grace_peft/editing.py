"""The edit loop (spec §3): one edit = probe, codebook update, train only the retrieved value, verify.

:class:`GraceEditor` turns ``(prompt, target)`` pairs into edits of a GRACE-wrapped model:

1. probe: a forward pass (no gradient) records, at every GRACE layer of the adapter, the query (the layer input at
   the query token) and the layer's current output there; it also tells whether the target is already predicted;
2. update: each layer's codebook applies ADD / EXPAND / SPLIT / OVERWRITE with the edit's exact target token ids;
3. train: only the value chosen by the update is trained, by Adam on the model's own loss with the target labelled,
   until the target is predicted (or another early-stop rule) and at most ``max_steps`` steps;
4. verify: a normal inference pass (codebook lookup, no forcing) says whether the edit took.

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
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .codebook import CodebookOperation
from .config import GraceConfig
from .frozen_prefix import blocks_below, replay_frozen_blocks
from .layer import GraceLayer
from .query import IGNORE_INDEX, QUERY_POSITIONS_KWARG, label_query_positions

if TYPE_CHECKING:
    from accelerate import Accelerator


class Task(str, Enum):
    """What kind of model is edited: it decides how edits are tokenized and scored."""

    CAUSAL_LM = "causal_lm"
    SEQ2SEQ_LM = "seq2seq_lm"
    SEQUENCE_CLASSIFICATION = "sequence_classification"


@dataclass(frozen=True)
class Edit:
    """One requested edit: a prompt and what the model should answer (a string, or a class id for classifiers)."""

    prompt: str
    target: str | int


EditLike = Edit | tuple | dict


@dataclass
class EditReport:
    """What one edit did. ``operations`` maps each wrapped module to its codebook operation (empty if skipped)."""

    prompt: str
    target: str | int
    edit_id: int | None
    skipped: bool
    operations: dict[str, CodebookOperation] = field(default_factory=dict)
    steps: int = 0
    loss: float = float("nan")
    success: bool = False
    seconds: float = 0.0

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


@dataclass
class EncodedEdit:
    """Model inputs for one edit, and the exact token ids that label it in the codebook."""

    inputs: dict[str, torch.Tensor]
    label_ids: torch.Tensor


def detect_task(model: nn.Module) -> Task:
    """Guess the task from a transformers model (pass ``task=`` to :class:`GraceEditor` to override)."""
    base = _transformers_model(model)
    config = getattr(base, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return Task.SEQ2SEQ_LM
    if type(base).__name__.endswith("ForSequenceClassification"):
        return Task.SEQUENCE_CLASSIFICATION
    can_generate = getattr(base, "can_generate", None)
    if callable(can_generate) and can_generate():
        return Task.CAUSAL_LM
    raise ValueError(f"Cannot tell how to edit a {type(base).__name__}; pass task='causal_lm', 'seq2seq_lm' or "
                     "'sequence_classification' to GraceEditor.")


def encode_edit(tokenizer, task: Task, prompt: str, target: str | int, *, chat: bool = False) -> EncodedEdit:
    """Tokenize one edit. Causal LMs: ``prompt + " " + target`` with only the target tokens labelled (the leading
    space is part of the target, as the model would generate it); with ``chat``, the prompt is first rendered as a
    user turn of the tokenizer's chat template (:func:`chat_prompt`) and the target is the assistant's answer.
    Seq2seq: the target as decoder labels; classifiers: the class id."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"An edit needs a non-empty prompt, got {prompt!r}.")
    if chat and task is not Task.CAUSAL_LM:
        raise ValueError(f"Chat templates apply to causal LMs, not to a {task.value} model.")
    if task is Task.SEQUENCE_CLASSIFICATION:
        if isinstance(target, bool) or not isinstance(target, int):
            raise ValueError(f"A classifier edit's target is a class id (int), got {target!r}.")
        inputs = tokenizer(prompt, return_tensors="pt")
        label = torch.tensor([target])
        return EncodedEdit({**inputs, "labels": label}, label)
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"An edit needs a non-empty target string, got {target!r} (prompt {prompt!r}).")
    if task is Task.SEQ2SEQ_LM:
        inputs = tokenizer(prompt, return_tensors="pt")
        labels = tokenizer(text_target=target, return_tensors="pt")["input_ids"]
        return EncodedEdit({**inputs, "labels": labels}, labels[0])
    if chat:
        prompt_ids, target_ids = causal_lm_token_ids(tokenizer, chat_prompt(tokenizer, prompt), target.strip(),
                                                     add_special_tokens=False)
    else:
        prompt_ids, target_ids = causal_lm_token_ids(tokenizer, prompt, target)
    input_ids = torch.tensor([prompt_ids + target_ids])
    labels = torch.tensor([[IGNORE_INDEX] * len(prompt_ids) + target_ids])
    return EncodedEdit(
        {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels},
        torch.tensor(target_ids),
    )


def chat_prompt(tokenizer, prompt: str) -> str:
    """``prompt`` as a user turn of the tokenizer's chat template, followed by the opening of the assistant's turn
    (the text the model continues with its answer; the last token of it is the GRACE query)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{type(tokenizer).__name__} has no chat template; edit with chat=False, or set "
                         "tokenizer.chat_template.")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def causal_lm_token_ids(tokenizer, prompt: str, target: str, *,
                        add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
    """Prompt token ids and the target's continuation token ids, as the model sees ``prompt + " " + target`` (no
    space after a prompt that ends in whitespace, such as a chat template's assistant header)."""
    separator = "" if target[:1].isspace() or prompt[-1:].isspace() else " "
    eos = tokenizer.eos_token_id

    def ids(text: str) -> list[int]:
        tokens = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return tokens[:-1] if tokens and eos is not None and tokens[-1] == eos else tokens

    prompt_ids, full_ids = ids(prompt), ids(prompt + separator + target)
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return prompt_ids, full_ids[len(prompt_ids):]
    # the tokenizer merged across the boundary: tokenize the continuation on its own
    return prompt_ids, tokenizer(separator + target, add_special_tokens=False)["input_ids"]


def target_predicted(task: Task, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: is every labelled target token (or the class) the model's argmax? Causal LMs predict token ``t``
    from position ``t - 1``."""
    if task is Task.SEQUENCE_CLASSIFICATION:
        return logits.argmax(-1).to(labels.device) == labels
    predictions = logits.argmax(-1).to(labels.device)
    if task is Task.CAUSAL_LM:
        predictions, labels = predictions[:, :-1], labels[:, 1:]
    labelled = labels != IGNORE_INDEX
    return ((predictions == labels) | ~labelled).all(-1) & labelled.any(-1)


def collate(rows: list[dict[str, torch.Tensor]], task: Task, pad_id: int) -> dict[str, torch.Tensor]:
    """Batch one-row model inputs. Causal LMs are padded on the left (generation continues every row right after
    its prompt) and get position ids from the attention mask, so that padding never shifts absolute positions;
    seq2seq inputs and labels are padded on the right; classifier labels are stacked."""
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    left = task is Task.CAUSAL_LM
    batch = {}
    for name in rows[0]:
        if rows[0][name].dim() == 1:  # one value per row (a class id)
            batch[name] = torch.cat([row[name] for row in rows])
            continue
        sequences = [row[name][0] for row in rows]
        width = max(len(sequence) for sequence in sequences)
        padded = torch.full((len(rows), width), fill.get(name, 0), dtype=sequences[0].dtype)
        for index, sequence in enumerate(sequences):
            if left:
                padded[index, width - len(sequence):] = sequence
            else:
                padded[index, :len(sequence)] = sequence
        batch[name] = padded
    if left and "attention_mask" in batch:
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    return batch


def per_row_loss(task: Task, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's own loss, as the model computes it for that row alone: the mean cross-entropy over its labelled
    tokens (causal LMs predict token ``t`` from position ``t - 1``), or over its class for classifiers."""
    if task is Task.SEQUENCE_CLASSIFICATION:
        return nn.functional.cross_entropy(logits.float(), labels.to(logits.device), reduction="none")
    labels = labels.to(logits.device)
    if task is Task.CAUSAL_LM:
        logits, labels = logits[:, :-1], labels[:, 1:]
    tokens = nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                         reduction="none")
    return tokens.sum(-1) / (labels != IGNORE_INDEX).sum(-1).clamp_min(1)


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
    next edit reads, so edits cannot be split across processes; see :mod:`grace_peft.distributed` for evaluation).
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
        self.layers = {
            name.removeprefix("base_model.model."): module
            for name, module in model.named_modules()
            if isinstance(module, GraceLayer) and self.adapter_name in module.grace_codebook
        }
        if not self.layers:
            raise ValueError(
                f"No GRACE adapter named '{self.adapter_name}' in this model. Wrap the model first: "
                "get_peft_model(model, GraceConfig(target_modules=[...])), after `import grace_peft`."
            )
        forward = getattr(_transformers_model(model), "forward", None)
        self._keeps_logits = forward is not None and "logits_to_keep" in inspect.signature(forward).parameters
        self._call_state = next(iter(self.layers.values())).call_state
        self.frozen_blocks = blocks_below(_transformers_model(model), list(self.layers)) if reuse_frozen_layers \
            else []

    @property
    def config(self) -> GraceConfig:
        return self.model.peft_config[self.adapter_name]

    # ------------------------------------------------------------------------------------------ public API
    def edit(self, prompt: str, target: str | int) -> EditReport:
        """Apply one edit and report what happened."""
        encoded = encode_edit(self.tokenizer, self.task, prompt, target, chat=self.chat)
        return self.apply(encoded, prompt=prompt, target=target)

    def edit_many(self, edits: Iterable[EditLike], *, batch_size: int = 1,
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
        edits = [as_edit(item) for item in edits]
        show = self.progress if progress is None else progress
        reports: list[EditReport] = []
        with tqdm(total=len(edits), desc="GRACE edits", unit="edit", disable=not show) as bar:
            while len(reports) < len(edits):
                chunk = edits[len(reports):len(reports) + batch_size]
                encoded = [encode_edit(self.tokenizer, self.task, item.prompt, item.target, chat=self.chat)
                           for item in chunk]
                done = self._apply_rows(encoded, chunk)
                reports.extend(done)
                bar.update(len(done))
                bar.set_postfix(keys=self.num_keys(), ok=sum(r.success for r in reports))
        return reports

    def num_keys(self) -> int:
        """Codebook entries of the edited adapter, over all wrapped modules."""
        return sum(len(layer.grace_codebook[self.adapter_name]) for layer in self.layers.values())

    def apply(self, encoded: EncodedEdit, *, prompt: str = "", target: str | int = "") -> EditReport:
        """Apply one already-tokenized edit."""
        return self._apply_rows([encoded], [Edit(prompt, target)])[0]

    # ------------------------------------------------------------------------------------------ steps
    def _apply_rows(self, encoded: list[EncodedEdit], edits: list[Edit]) -> list[EditReport]:
        """Edit a batch of rows; returns the reports of the leading rows applied (at least one)."""
        started = time.perf_counter()
        inputs = self._batch([item.inputs for item in encoded])
        with _eval_mode(self.model), _codebooks_restored_on_error(self._codebooks()):
            probes, logits = self._probe(inputs)
            predicted = target_predicted(self.task, logits, inputs["labels"]).tolist()
            plans = self._update_codebooks(encoded, probes, predicted)
            trained = [row for row, plan in enumerate(plans) if plan is not None]
            steps = [0] * len(plans)
            if trained:
                every_row = trained == list(range(len(encoded)))
                batch = inputs if every_row else self._batch([encoded[row].inputs for row in trained])
                values = {name: [plans[row].values[name][1] for row in trained] for name in self.layers}
                with replay_frozen_blocks(self.frozen_blocks):
                    for row, count in zip(trained, self._train(batch, values), strict=True):
                        steps[row] = count
                for row in trained:
                    for name, (index, value) in plans[row].values.items():
                        self.layers[name].grace_codebook[self.adapter_name].set_value(index, value)
                losses, successes = self._verify(batch)  # full passes, no replay: the edits as inference sees them
            seconds = (time.perf_counter() - started) / len(plans)
        reports = []
        for row, (plan, edit) in enumerate(zip(plans, edits, strict=False)):
            if plan is None:
                reports.append(EditReport(edit.prompt, edit.target, None, skipped=True, success=True, seconds=seconds))
                continue
            position = trained.index(row)
            reports.append(EditReport(edit.prompt, edit.target, plan.edit_id, skipped=False,
                                      operations=plan.operations, steps=steps[row], loss=losses[position],
                                      success=successes[position], seconds=seconds))
        return reports

    def _update_codebooks(self, encoded: list[EncodedEdit], probes, predicted: list[bool]) -> list[_RowPlan | None]:
        """Update the codebooks row by row, in order; per row, its plan, or None when skipped (already correct).

        Stops before the first row whose query reaches an entry that an earlier row of this batch created or
        changed (that row goes to the next batch)."""
        plans: list[_RowPlan | None] = []
        touched: dict[str, set[int]] = {name: set() for name in self.layers}
        for row, item in enumerate(encoded):
            if row > 0 and self._reaches_touched(probes, row, touched):
                break
            if self.config.skip_if_correct and predicted[row]:
                plans.append(None)
                continue
            edit_id = max(int(codebook.next_edit_id) for codebook in self._codebooks())
            plan = _RowPlan(edit_id, {}, {})
            for name, layer in self.layers.items():
                query, current = probes[name]
                codebook = layer.grace_codebook[self.adapter_name]
                update = codebook.update(query[row], item.label_ids, edit_id=edit_id,
                                         init_value=self._initial_value(current[row], edit_id, name))
                touched[name].add(update.index)
                if update.operation is CodebookOperation.SPLIT:
                    touched[name].add(update.nearest)
                plan.operations[name] = update.operation
                plan.values[name] = (update.index,
                                     codebook.values[update.index].detach().clone().requires_grad_(True))
            plans.append(plan)
        return plans

    def _reaches_touched(self, probes, row: int, touched: dict[str, set[int]]) -> bool:
        for name, layer in self.layers.items():
            codebook = layer.grace_codebook[self.adapter_name]
            if not touched[name] or len(codebook) == 0:
                continue
            index, distance = codebook.nearest(probes[name][0][row])
            if int(index) in touched[name] and codebook.reaches(int(index), float(distance)):
                return True
        return False

    @torch.no_grad()
    def _probe(self, inputs: dict[str, torch.Tensor]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]],
                                                                torch.Tensor]:
        with self._call_state.recording_queries() as recorded, self._autocast():
            logits = self.model(**inputs).logits
        probes = {name: recorded.get((layer, self.adapter_name)) for name, layer in self.layers.items()}
        missing = [name for name, probe in probes.items() if probe is None]
        if missing:
            raise RuntimeError(f"GRACE layers {missing} did not run in the forward pass; is the adapter active?")
        for name, (query, _) in probes.items():
            if not torch.isfinite(query).all():
                raise ValueError(f"The input of '{name}' contains NaN or inf for this edit; the model's forward pass "
                                 "is numerically broken before the edited layer (check its dtype and weights).")
        return probes, logits

    def _train(self, inputs: dict[str, torch.Tensor], values: dict[str, list[torch.Tensor]]) -> list[int]:
        """Train each row's values (one Adam per row, on that row's own loss) until the row is done or
        ``max_steps``; returns the steps each row took."""
        config = self.config
        rows = len(inputs["labels"])
        optimizers = [torch.optim.Adam([values[name][row] for name in values], lr=config.learning_rate)
                      for row in range(rows)]
        steps = [0] * rows
        active = [True] * rows
        inputs, labels = self._training_inputs(inputs)
        scaler = getattr(self.accelerator, "scaler", None)  # fp16 only
        with torch.enable_grad():
            for _ in range(config.max_steps):
                forced = {(self.layers[name], self.adapter_name): torch.stack(row_values)
                          for name, row_values in values.items()}
                with self._call_state.forcing_values(forced), self._autocast():
                    logits = self.model(**inputs).logits
                losses = per_row_loss(self.task, logits, labels)
                if not torch.isfinite(losses).all():
                    raise FloatingPointError(f"An edit's loss became {losses.tolist()} after {max(steps)} steps; "
                                             "lower GraceConfig.learning_rate.")
                finished = self._done(logits, losses, labels)
                active = [still and not done for still, done in zip(active, finished, strict=True)]
                if not any(active):
                    break
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                loss = losses.sum()  # each value only gets its own row's gradient
                (loss if scaler is None else scaler.scale(loss)).backward()
                for row, optimizer in enumerate(optimizers):
                    if active[row]:
                        if scaler is None:
                            optimizer.step()
                        else:
                            scaler.step(optimizer)  # unscales; skips the step if the gradient overflowed
                        steps[row] += 1
                if scaler is not None:
                    scaler.update()
        return steps

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

    def _done(self, logits: torch.Tensor, losses: torch.Tensor, labels: torch.Tensor) -> list[bool]:
        rule = self.config.early_stop
        if rule == "predicted":
            return target_predicted(self.task, logits, labels).tolist()
        if rule == "loss":
            return (losses.detach() < self.config.stop_loss).tolist()
        return [False] * len(losses)

    @torch.no_grad()
    def _verify(self, inputs: dict[str, torch.Tensor]) -> tuple[list[float], list[bool]]:
        with self._autocast():
            logits = self.model(**inputs).logits
        losses = per_row_loss(self.task, logits, inputs["labels"])
        return losses.tolist(), target_predicted(self.task, logits, inputs["labels"]).tolist()

    def _batch(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        batch = collate(rows, self.task, 0 if pad is None else pad)
        return {name: tensor.to(self._input_device()) for name, tensor in batch.items()}

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

    def _input_device(self) -> torch.device:
        embeddings = self.model.get_input_embeddings()
        return embeddings.weight.device


def as_edit(item: EditLike) -> Edit:
    """Accept ``Edit``, ``(prompt, target)`` or ``{"prompt": ..., "target": ...}``."""
    if isinstance(item, Edit):
        return item
    if isinstance(item, dict):
        if "prompt" not in item or "target" not in item:
            raise ValueError(f"An edit dict needs 'prompt' and 'target' keys, got {sorted(item)}.")
        return Edit(item["prompt"], item["target"])
    if isinstance(item, tuple) and len(item) == 2:
        return Edit(*item)
    raise ValueError(f"Cannot read an edit from {item!r}: use Edit(prompt, target), (prompt, target) or a dict.")


def _transformers_model(model: nn.Module) -> nn.Module:
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


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
            "the adapter, and load it in every process to evaluate (grace_peft.distributed.evaluate_data_parallel)."
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
