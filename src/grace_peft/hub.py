"""Sharing GRACE edits through the Hugging Face Hub: a model card for the codebook, and a push that publishes it.

Pulling needs nothing special: ``import grace_peft`` and ``PeftModel.from_pretrained(base, "user/repo",
revision=...)`` reproduce the pushed model bit for bit, and with ``HF_HUB_OFFLINE=1`` a cached copy loads without
network.

``import grace_peft`` routes ``PeftModel.push_to_hub`` to :func:`push_edits` for models whose active adapter is a
GRACE adapter (others keep peft's behaviour; see :mod:`grace_peft.registration`): the inherited method
(transformers' ``PushToHubMixin``) would save the adapter, then overwrite the README that peft wrote with
transformers' generic card (``library_name: transformers``), or with whatever card the repo already has.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from huggingface_hub import CommitInfo, HfApi, ModelCardData
from huggingface_hub.constants import DEFAULT_REVISION
from peft import PeftModel
from torch import nn

from .codebook import Codebook
from .inputs import Task, detect_task
from .model import grace_layers
from .registration import GRACE_PEFT_TYPE

__all__ = ["EDITS_FILE", "card_for", "model_card", "push_edits"]

EDITS_FILE = "edits.jsonl"
CARD_TAGS = ("grace", "model-editing", "peft")
PAPER = "https://arxiv.org/abs/2211.11031"
_PIPELINE_TAGS = {Task.CAUSAL_LM: "text-generation", Task.SEQUENCE_CLASSIFICATION: "text-classification"}
_AUTO_CLASSES = {Task.CAUSAL_LM: "AutoModelForCausalLM", Task.SEQ2SEQ_LM: "AutoModelForSeq2SeqLM",
                 Task.SEQUENCE_CLASSIFICATION: "AutoModelForSequenceClassification"}
CARD_MARKER = ("<!-- Written by grace_peft on every save_pretrained / push_to_hub. Delete this line to keep your "
               "own edits of this card. -->")
_HUB_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def model_card(model: PeftModel, adapter_name: str = "default", *, include_edits: bool = False,
               edits: Iterable[Any] | None = None, repo_id: str | None = None, revision: str | None = None,
               base_model: str | None = None, tags: Sequence[str] = ()) -> str:
    """The Hub model card (README.md) of a GRACE adapter.

    YAML front matter (``library_name: peft``, ``base_model``, tags ``grace``/``model-editing``/``peft``,
    ``pipeline_tag``), then the edited layers with their keys and edits seen, the GRACE settings, a usage snippet
    for ``repo_id``/``revision``, and what is published about the edits: a table of prompts and targets only when
    ``include_edits`` (``edits``: ``(prompt, target)`` pairs, dicts or objects with ``.prompt``/``.target``, such as
    the reports of ``GraceEditor.edit_many``). ``base_model`` overrides the model's recorded name (use it
    when the base was loaded from a local folder); a name that is not a Hub model id is left out of the metadata.
    """
    config = _grace_config(model, adapter_name)
    base = base_model or config.base_model_name_or_path or getattr(model.get_base_model(), "name_or_path", None)
    return card_for(config, _codebooks(model, adapter_name), _task(model), adapter_name=adapter_name,
                    include_edits=include_edits, edits=edits, repo_id=repo_id, revision=revision, base_model=base,
                    tags=tags)


def card_for(config, codebooks: Mapping[str, Codebook], task: Task | None, *, adapter_name: str = "default",
             include_edits: bool = False, edits: Iterable[Any] | None = None, repo_id: str | None = None,
             revision: str | None = None, base_model: str | None = None, tags: Sequence[str] = ()) -> str:
    """:func:`model_card` from an adapter's config and codebooks (by module name) alone, without a model (for
    adapters written from their files, such as ``grace-peft remove`` and ``merge``)."""
    rows = _edit_rows(edits) if include_edits else []
    base = base_model or config.base_model_name_or_path or None
    hub_base = base if base and _HUB_MODEL_ID.match(base) and not os.path.exists(base) else None
    keys = sum(len(codebook) for codebook in codebooks.values())
    edits_seen = max((int(codebook.next_edit_id) for codebook in codebooks.values()), default=0)
    journaled = len(set().union(*(codebook.journal.edit_ids() for codebook in codebooks.values())))

    card_tags = list(dict.fromkeys([*CARD_TAGS, *tags, *([f"base_model:adapter:{hub_base}"] if hub_base else [])]))
    metadata = ModelCardData(library_name="peft", base_model=hub_base, tags=card_tags,
                             pipeline_tag=_PIPELINE_TAGS.get(task))
    base_label = f"`{hub_base}`" if hub_base else "a local base model"
    lines = [
        "---", metadata.to_yaml(), "---", "",
        f"# GRACE edits of {base_label}", "",
        f"A [GRACE]({PAPER}) adapter (lifelong model editing with a discrete key-value codebook) for {base_label}, "
        "made with `grace_peft`, a GRACE plugin for [PEFT](https://github.com/huggingface/peft). The base model's "
        "weights are unchanged: at each edited layer, an input that lands within a key's radius gets the key's "
        "learned value as the layer's output; every other input runs through the original layer. "
        f"It holds **{keys} keys** from **{edits_seen} edits**.", "",
        "## Edited layers", "",
        "| layer (target module) | keys | edits seen |", "|---|---:|---:|",
        *(f"| `{name}` | {len(codebook)} | {int(codebook.next_edit_id)} |" for name, codebook in codebooks.items()),
        "",
        "## Settings", "",
        f"- `eps_init` (radius of a new key): {config.eps_init}",
        f"- `replacement` (output positions a retrieved value replaces): `{config.replacement}`",
        f"- `eps_expand` (how a radius grows on a same-label edit): `{config.eps_expand}`",
        f"- `eps_split` (radii when an edit lands near a key with another label): `{config.eps_split}`",
        f"- `key` (what the codebook searches): `{config.key}`"
        + (f", made of the input of `{config.key_module}`" if config.key_module else ""),
        f"- `optimizer` (how a value is trained): `{config.optimizer}`", "",
        "## Usage", "",
        "```python",
        "import grace_peft  # registers GRACE with peft: needed before PeftModel.from_pretrained",
        "from peft import PeftModel",
        f"from transformers import {_AUTO_CLASSES.get(task, 'AutoModel')}", "",
        f"base = {_AUTO_CLASSES.get(task, 'AutoModel')}.from_pretrained({json.dumps(hub_base or 'path/to/base')})",
        f"model = PeftModel.from_pretrained(base, {_load_arguments(repo_id, revision, adapter_name)})",
        "```", "",
        "The loaded model reproduces the edited one bit for bit. Once downloaded, it also loads offline "
        "(`HF_HUB_OFFLINE=1`) from the Hugging Face cache.", "",
        "## Edits", "",
        f"The adapter's journal records {journaled} of the edits it holds (operation, entries, target tokens, "
        "outcome: `grace-peft list` shows them, `grace-peft remove` takes one back).", "",
        *(_edits_section(rows) if include_edits else _private_edits_section()),
        "", CARD_MARKER,
    ]
    return "\n".join(lines) + "\n"


def is_replaceable_card(text: str) -> bool:
    """Whether a README found in an adapter folder may be replaced by our card on save: ours (it carries
    :data:`CARD_MARKER`) or peft's generic template; a card the user wrote stays."""
    return CARD_MARKER in text or "[More Information Needed]" in text


def push_edits(model: PeftModel, repo_id: str, *, adapter_name: str = "default", include_edits: bool = False,
               edits: Iterable[Any] | None = None, private: bool | None = None, revision: str | None = None,
               commit_message: str | None = None, commit_description: str | None = None,
               token: str | bool | None = None, create_pr: bool = False, base_model: str | None = None,
               tags: Sequence[str] = ()) -> CommitInfo:
    """Push a GRACE adapter to the Hub: ``adapter_config.json``, ``adapter_model.safetensors`` and our README.md.

    The repo is created if needed (``private`` applies to a new repo), the branch ``revision`` too (from
    ``main``); ``commit_message``, ``commit_description``, ``token`` and ``create_pr`` pass through to
    ``huggingface_hub`` (a pull request is always opened against ``main``, so ``create_pr`` excludes a
    ``revision``). The card is :func:`model_card`.

    By default no edit text is published: neither the card nor any file names the prompts or the targets. That
    is not "nothing about the edits": the codebook labels each key with the exact **token ids of its edit's
    target**, so anyone with the base model's tokenizer can decode the targets, and the keys are the edited
    layer's activations at the prompts. With ``include_edits=True`` the ``edits`` (``(prompt, target)`` pairs,
    dicts or ``EditReport``-like objects) also go into ``edits.jsonl`` (the JSONL format of ``grace-peft edit``)
    and into a table on the card. Returns huggingface_hub's ``CommitInfo``.
    """
    _grace_config(model, adapter_name)
    if include_edits and edits is None:
        raise ValueError("include_edits=True publishes the edits' text: pass them as edits=[(prompt, target), ...] "
                         "(or the EditReports of GraceEditor.edit_many).")
    if create_pr and revision not in (None, DEFAULT_REVISION):
        raise ValueError(f"create_pr=True opens a pull request against '{DEFAULT_REVISION}'; it cannot target "
                         f"revision={revision!r}.")
    rows = _edit_rows(edits) if include_edits else []
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="grace-push-") as folder:
        model.save_pretrained(folder, selected_adapters=[adapter_name])
        card = model_card(model, adapter_name, include_edits=include_edits, edits=rows, repo_id=repo_id,
                          revision=revision, base_model=base_model, tags=tags)
        with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as file:  # replaces peft's card
            file.write(card)
        if include_edits:
            with open(os.path.join(folder, EDITS_FILE), "w", encoding="utf-8") as file:
                file.writelines(json.dumps({"prompt": p, "target": t}, ensure_ascii=False) + "\n" for p, t in rows)
        keys = sum(len(codebook) for codebook in _codebooks(model, adapter_name).values())
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message or f"Upload GRACE edits ({keys} keys)",
                                 commit_description=commit_description)


# ---------------------------------------------------------------------------------------------- helpers
def _grace_config(model: nn.Module, adapter_name: str):
    configs = getattr(model, "peft_config", None)
    if not isinstance(model, PeftModel) or not isinstance(configs, dict):
        raise TypeError(f"Expected a PeftModel with a GRACE adapter, got a {type(model).__name__}.")
    config = configs.get(adapter_name)
    if config is None or config.peft_type != GRACE_PEFT_TYPE:
        grace = [name for name, cfg in configs.items() if cfg.peft_type == GRACE_PEFT_TYPE]
        raise ValueError(f"No GRACE adapter named '{adapter_name}' in this model (GRACE adapters: {grace}).")
    return config


def _codebooks(model: nn.Module, adapter_name: str) -> dict[str, Codebook]:
    return {name: layer.grace_codebook[adapter_name] for name, layer in grace_layers(model, adapter_name).items()}


def _task(model: nn.Module) -> Task | None:
    try:
        return detect_task(model)
    except ValueError:
        return None


def _edit_rows(edits: Iterable[Any] | None) -> list[tuple[str, str | int]]:
    rows = []
    for item in edits or ():
        if isinstance(item, dict):
            rows.append((item["prompt"], item["target"]))
        elif isinstance(item, tuple):
            prompt, target = item
            rows.append((prompt, target))
        else:
            rows.append((item.prompt, item.target))
    return rows


def _load_arguments(repo_id: str | None, revision: str | None, adapter_name: str) -> str:
    arguments = [json.dumps(repo_id or "<repo_id>")]
    if revision is not None:
        arguments.append(f"revision={json.dumps(revision)}")
    if adapter_name != "default":  # peft saves other adapters in a subfolder named after them
        arguments += [f"subfolder={json.dumps(adapter_name)}", f"adapter_name={json.dumps(adapter_name)}"]
    return ", ".join(arguments)


def _cell(value: str | int) -> str:
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _edits_section(rows: list[tuple[str, str | int]]) -> list[str]:
    return [
        f"The {len(rows)} edits below are also in `{EDITS_FILE}` (one JSON object per line, `prompt` and `target`).",
        "", "| # | prompt | target |", "|---:|---|---|",
        *(f"| {index} | {_cell(prompt)} | {_cell(target)} |" for index, (prompt, target) in enumerate(rows)),
    ]


def _private_edits_section() -> list[str]:
    return [
        "The text of the edits (prompts and targets) is not published here. The codebook still labels each key "
        "with the token ids of its edit's target, which the base model's tokenizer decodes, and its keys are the "
        "edited layer's activations at the prompts.",
    ]


def grace_push_to_hub(original):
    """``PeftModel.push_to_hub`` that pushes GRACE adapters with :func:`push_edits` (and so with our card), and
    other adapters with ``original``; installed by :func:`grace_peft.registration.install`."""

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        adapter = self.active_adapter
        if self.peft_config[adapter].peft_type != GRACE_PEFT_TYPE:
            return original(self, repo_id, **kwargs)
        kwargs.pop("max_shard_size", None)  # adapters are small; PeftModel.save_pretrained ignores it too
        return push_edits(self, repo_id, adapter_name=adapter, tags=kwargs.pop("tags", None) or (), **kwargs)

    return push_to_hub
