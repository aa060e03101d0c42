"""`GraceConfig`: what a GRACE adapter edits and how it learns (round-trips through ``adapter_config.json``)."""

from __future__ import annotations

import copy
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig
from peft.utils import CONFIG_NAME

from .codebook import ExpandRule, SplitRule
from .keys import KEY_FUNCTIONS
from .registration import GRACE_PEFT_TYPE
from .saving import config_saved_with_weights

REPLACEMENT_MODES = ("replace_last", "replace_all", "replace_prompt")
VALUE_INITS = ("warm", "cold")
EARLY_STOP_RULES = ("predicted", "loss", "never")
OPTIMIZERS = ("adam", "line_search")


@dataclass
class GraceConfig(PeftConfig):
    """Configuration of a GRACE adapter (a codebook at each target module).

    Args:
        target_modules: Modules to wrap, as in every PEFT method: a list of exact names or name suffixes
            (``["model.layers.20.mlp.down_proj"]``, ``["h.5.mlp.c_proj"]``), or one regex matched against the whole
            name. GRACE is meant for one layer (an MLP output projection); several are allowed, each with its own
            codebook.
        exclude_modules: Modules never to wrap, same syntax.
        eps_init: Radius of a new key (layer-input space, Euclidean). Larger balls generalize to more paraphrases
            but risk firing on unrelated inputs; it depends on the layer's activation scale.
        eps_expand: How a key's ball grows when a new edit with the same label lands inside it: ``"coverage"``
            (radius becomes the distance to the query; the authors' code), ``"paper"`` (radius + eps_init) or
            ``"moving_average"`` (the key moves halfway to the query).
        key: What the codebook searches (see :mod:`grace_peft.keys`): ``"last_token"`` (the paper's key: the layer
            input at the last prompt token, Euclidean; radii in the layer's activation scale) or ``"prompt_mean"``
            (the layer input averaged over the prompt's tokens, less a background mean, on the unit sphere: radii
            between 0 and 2, and rewordings of a prompt land much nearer each other than other prompts do; use
            :func:`grace_peft.calibrate` for its center and radius).
        key_module: The module whose input the key is made of, when it is not the wrapped module itself (``None``):
            a Linear or Conv1D that runs before the wrapped module in the same token sequence, e.g.
            ``"model.layers.3.mlp.down_proj"``. The value still replaces the wrapped module's output, so an edit is
            recognised where its rewordings lie close together and steers the answer where the answer is made.
        eps_split: What SPLIT does to the radii when a new edit lands in the ball of a key with another label:
            ``"halve"`` (both at most half the distance between the keys: the paper) or ``"keep"`` (radii stay, the
            nearest key decides: the balls' full coverage is kept).
        replacement: Which output positions a retrieved value replaces: ``"replace_last"`` (only the query token,
            the default: it leaves every other position of the sequence as the base model computes it),
            ``"replace_all"`` (every position, the paper's broadcast) or ``"replace_prompt"`` (the prompt up to
            and including the query token).
        value_init: ``"warm"`` starts a new value from the layer's current output at the query token (with
            ``replace_last`` the model is unchanged until training moves it; the other modes copy it to more
            positions); ``"cold"`` draws it at random (the paper), seeded by ``seed`` and
            the edit id, so editing never touches the global RNG.
        value_contexts: Train each value under this many contexts besides the edit prompt itself: the prompt preceded by
            a short text the model writes itself (seeded by ``seed``, the same texts for every edit). A value trained
            so still carries the edit when a reworded prompt, whose other tokens differ, retrieves it. ``0`` (the
            paper) trains on the edit prompt alone; each context adds a row to every training step.
        optimizer: How a value is trained: ``"adam"`` (the reference, at ``learning_rate``) or ``"line_search"``
            (normalized gradient steps; the first is ``line_search_step`` times the value's norm, then each step
            doubles after progress and halves otherwise: no rate in the layer's units to choose, see
            :mod:`grace_peft.optimizers`).
        line_search_step: The first step of ``"line_search"``, as a fraction of the value's norm.
        learning_rate: Adam learning rate for the value of an edit (reference: 1.0).
        max_steps: Cap on optimizer steps per edit (reference: 100).
        early_stop: ``"predicted"`` stops once every target token is the argmax; ``"loss"`` once the loss is below
            ``stop_loss``; ``"never"`` always runs ``max_steps`` (the reference procedure).
        stop_loss: Loss threshold for ``early_stop="loss"``.
        skip_if_correct: Skip edits whose target the model already predicts ("edit only on error", as the authors).
        seed: Seed of the random values drawn by ``value_init="cold"``.
        subject_gate: Gate every entry by its edit's subject (``GraceEditor.edit(prompt, target, subject=...)``):
            the entry can only be retrieved by a prompt that contains the subject's tokens (as the subject is
            tokenized at the start of a text or after a space), and an edit only meets entries its own prompt may
            retrieve. Rewordings of a question keep its subject; another question with the same wording and
            another subject (a key near the edit's) does not fire it. Every edit must name its subject.
        journal_limit: How many edit records each codebook's journal keeps (see :mod:`grace_peft.journal`): what
            every edit did, so that it can be listed, traced and taken back (``GraceEditor.remove``). When full, the
            oldest tenth is dropped; those edits stay in the codebook but can no longer be undone. ``0`` keeps no
            journal (the codebook alone: 4 x (key width + value width) bytes per key plus its label, radius and id).
        journal_text: Also keep each edit's prompt and target text in the journal, and so in the saved adapter and
            anything pushed to the Hub (off by default, like ``push_edits(include_edits=...)``: without it the
            journal holds the target's token ids, as the codebook's labels already do, but no text).
        codebook_sizes: Written on save (the live config is left as it is): per wrapped module, the codebook's
            entries (``size``) and label token count (``label_size``), so that a fresh model can allocate the saved
            shapes before loading (transformers' ``load_adapter`` compares shapes first). Not meant to be set by
            hand.
        save_id: Written on save, into this file and into the weights file's metadata: it ties the two together,
            so that a folder whose save was interrupted loads as one version (see :mod:`grace_peft.saving`).
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names (exact or suffix) or one regex of the modules that get a codebook."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (exact or suffix) or one regex of modules to leave alone."}
    )
    eps_init: float = field(default=1.0, metadata={"help": "Initial radius of a new key."})
    eps_expand: Literal["coverage", "paper", "moving_average"] = field(
        default="coverage", metadata={"help": "How a ball grows on a same-label edit."}
    )
    key: Literal["last_token", "prompt_mean"] = field(
        default="last_token", metadata={"help": "What the codebook searches: the key function."}
    )
    key_module: str | None = field(
        default=None, metadata={"help": "Module whose input makes the key (default: the wrapped module)."}
    )
    eps_split: Literal["halve", "keep"] = field(
        default="halve", metadata={"help": "How SPLIT treats radii: halve (the paper) or keep."}
    )
    replacement: Literal["replace_last", "replace_all", "replace_prompt"] = field(
        default="replace_last", metadata={"help": "Which positions a retrieved value replaces."}
    )
    value_init: Literal["warm", "cold"] = field(default="warm", metadata={"help": "How a new value starts."})
    value_contexts: int = field(
        default=0, metadata={"help": "Model-written contexts each value is also trained under (0: the prompt only)."}
    )
    optimizer: Literal["adam", "line_search"] = field(default="adam", metadata={"help": "How a value is trained."})
    line_search_step: float = field(
        default=0.25, metadata={"help": "First line-search step, as a fraction of the value's norm."}
    )
    learning_rate: float = field(default=1.0, metadata={"help": "Adam learning rate for a value."})
    max_steps: int = field(default=100, metadata={"help": "Maximum optimizer steps per edit."})
    early_stop: Literal["predicted", "loss", "never"] = field(
        default="predicted", metadata={"help": "When an edit stops training before max_steps."}
    )
    stop_loss: float = field(default=1e-2, metadata={"help": "Loss threshold for early_stop='loss'."})
    skip_if_correct: bool = field(default=False, metadata={"help": "Skip edits the model already gets right."})
    seed: int = field(default=0, metadata={"help": "Seed for value_init='cold'."})
    subject_gate: bool = field(
        default=False, metadata={"help": "An entry fires only on prompts that contain its edit's subject."}
    )
    journal_limit: int = field(
        default=100_000, metadata={"help": "Edit records each codebook's journal keeps (the oldest tenth goes first)."}
    )
    journal_text: bool = field(
        default=False, metadata={"help": "Keep each edit's prompt and target text in the journal (saved with it)."}
    )
    codebook_sizes: dict[str, dict[str, int]] = field(
        default_factory=dict, metadata={"help": "Codebook shapes per wrapped module, recorded on save."}
    )
    save_id: str | None = field(default=None, metadata={"help": "Ties this config to its weights file, on save."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = GRACE_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.target_modules is not None and len(self.target_modules) == 0:
            raise ValueError("GraceConfig.target_modules is empty: name the module(s) to edit, e.g. "
                             "target_modules=['model.layers.20.mlp.down_proj'].")
        if not (isinstance(self.eps_init, (int, float)) and math.isfinite(self.eps_init) and self.eps_init > 0):
            raise ValueError(f"GraceConfig.eps_init must be a positive finite number, got {self.eps_init!r}.")
        ExpandRule(self.eps_expand)  # raises on an unknown rule
        _check_choice("key", self.key, KEY_FUNCTIONS)
        _check_choice("eps_split", self.eps_split, tuple(rule.value for rule in SplitRule))
        _check_choice("replacement", self.replacement, REPLACEMENT_MODES)
        _check_choice("value_init", self.value_init, VALUE_INITS)
        _check_choice("early_stop", self.early_stop, EARLY_STOP_RULES)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if not (math.isfinite(self.line_search_step) and self.line_search_step > 0):
            raise ValueError(f"GraceConfig.line_search_step must be positive, got {self.line_search_step!r}.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"GraceConfig.learning_rate must be positive, got {self.learning_rate!r}.")
        if not isinstance(self.value_contexts, int) or isinstance(self.value_contexts, bool) or self.value_contexts < 0:
            raise ValueError(f"GraceConfig.value_contexts must be a whole number >= 0, got {self.value_contexts!r}.")
        if int(self.max_steps) != self.max_steps or self.max_steps < 1:
            raise ValueError(f"GraceConfig.max_steps must be a positive integer, got {self.max_steps!r}.")
        if int(self.journal_limit) != self.journal_limit or self.journal_limit < 0:
            raise ValueError(f"GraceConfig.journal_limit must be a whole number >= 0 (0: no journal), got "
                             f"{self.journal_limit!r}.")
        self.codebook_sizes = {str(name): _codebook_shape(shape) for name, shape in (self.codebook_sizes or {}).items()}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """peft's loader, except that a local folder whose config and weights come from different saves (an
        interrupted or concurrent save) gives the config its weights were saved with."""
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        saved_with_weights = config_saved_with_weights(folder) if os.path.isdir(folder) else None
        if saved_with_weights is not None:
            return cls.from_peft_type(**saved_with_weights)
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    def record_codebook_sizes_on_save(self, sizes: dict[str, dict[str, int]]) -> None:
        """Have the next :meth:`save_pretrained` write ``sizes`` as ``codebook_sizes`` (the tuner calls this while
        ``PeftModel.save_pretrained`` collects the weights), without changing this object's own field."""
        self.__dict__["_sizes_to_save"] = sizes

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write ``adapter_config.json`` atomically: an interrupted save leaves the previous file intact."""
        written = self
        sizes = self.__dict__.pop("_sizes_to_save", None)
        if sizes is not None:
            written = copy.copy(self)
            written.codebook_sizes = sizes
        os.makedirs(save_directory, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=save_directory, prefix=".grace-config-") as staging:
            PeftConfig.save_pretrained(written, staging, **kwargs)
            os.replace(os.path.join(staging, CONFIG_NAME), os.path.join(save_directory, CONFIG_NAME))


def _codebook_shape(shape: dict) -> dict:
    """A recorded codebook shape with plain ints (``journal``: the journal's sizes, absent before journals)."""
    normal = {"size": int(shape["size"]), "label_size": int(shape["label_size"])}
    if "gate_size" in shape:
        normal["gate_size"] = [int(size) for size in shape["gate_size"]]
    if isinstance(shape.get("journal"), dict):
        normal["journal"] = {str(name): int(size) for name, size in shape["journal"].items()}
    return normal


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"GraceConfig.{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")
