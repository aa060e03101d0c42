"""Pushing GRACE edits to the Hub and pulling them back, through the real huggingface_hub and peft code paths.

The Hub is a local HTTP stand-in (tests/hub_standin.py) with a temporary cache; no test touches the network except
the live one, which runs only with ``HF_TOKEN`` and ``GRACE_PEFT_LIVE_HUB=1``.
"""

from __future__ import annotations

import json
import os
import uuid

import huggingface_hub
import pytest
import torch
from conftest import FAR_PROMPT, NEAR_PROMPTS, tiny_gpt2
from hub_standin import HubStandIn
from huggingface_hub import ModelCard, constants
from peft import LoraConfig, PeftModel, get_peft_model

from grace_peft import GraceConfig, GraceEditor
from grace_peft.hub import EDITS_FILE, model_card, push_edits

BASE_ID = "grace-test/tiny-gpt2"
EDITS = [(NEAR_PROMPTS[0], "canberra"), (FAR_PROMPT, "microsoft")]
PROBES = [*NEAR_PROMPTS, FAR_PROMPT, "my favourite colour is", "where lives a river"]
TOKEN = "hf_standin_write_token"


def _base(tiny):
    """A fresh tiny GPT-2 that looks like one loaded with ``from_pretrained(BASE_ID)``."""
    model = tiny.fresh()
    model.name_or_path = BASE_ID
    model.config._name_or_path = BASE_ID
    return model


def _edit(tiny, base):
    model = get_peft_model(base, GraceConfig(target_modules=[tiny.target], eps_init=tiny.eps_init,
                                             replacement=tiny.replacement))
    reports = GraceEditor(model, tiny.tokenizer, progress=False).edit_many(EDITS)
    assert all(report.success for report in reports)
    return model.eval(), reports


@pytest.fixture(scope="module")
def edited():
    tiny = tiny_gpt2()
    return tiny, *_edit(tiny, _base(tiny))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The stand-in, with huggingface_hub pointed at it (its constants are read at import, so they are patched
    too) and an empty cache; no ambient token."""
    standin = HubStandIn().start()
    monkeypatch.setenv("HF_ENDPOINT", standin.url)
    monkeypatch.setattr(constants, "ENDPOINT", standin.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        standin.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", standin.url)  # behind huggingface_hub.file_exists
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    yield standin
    standin.stop()
    assert standin.unserved == []


def _logits(model, tokenizer) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**tokenizer(prompt, return_tensors="pt")).logits for prompt in PROBES]


def _codebook_state(model) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in model.state_dict().items() if ".grace_codebook." in name}


def _assert_same_model(pulled, edited_model, tokenizer) -> None:
    pulled.eval()
    expected, got = _codebook_state(edited_model), _codebook_state(pulled)
    assert sorted(got) == sorted(expected) and len(expected) >= 7
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert all(torch.equal(a, b) for a, b in zip(_logits(pulled, tokenizer), _logits(edited_model, tokenizer),
                                                 strict=True))


def _all_text(files: dict[str, bytes]) -> str:
    return "\n".join(data.decode("utf-8", errors="replace") for data in files.values())


# ---------------------------------------------------------------------------------------------- push and pull
def test_push_then_pull_reproduces_the_edited_model_bit_for_bit(hub, edited):
    tiny, model, _ = edited
    info = push_edits(model, "user/edits", token=TOKEN)

    files = hub.files("user/edits")
    assert sorted(files) == [".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert info.oid == hub.repos["user/edits"].refs["main"]
    unedited = _logits(tiny.fresh(), tiny.tokenizer)
    assert not torch.equal(_logits(model, tiny.tokenizer)[0], unedited[0])  # the edit shows, so a no-op load fails

    pulled = PeftModel.from_pretrained(_base(tiny), "user/edits")
    _assert_same_model(pulled, model, tiny.tokenizer)
    assert hub.requests_to("GET", "/user/edits/resolve/main/adapter_model.safetensors")


def test_the_uploaded_card_is_grace_s_not_a_generic_one(hub, edited):
    tiny, model, _ = edited
    push_edits(model, "user/edits", token=TOKEN)
    readme = hub.files("user/edits")["README.md"].decode()

    card = ModelCard(readme)
    assert card.data.library_name == "peft"
    assert card.data.base_model == BASE_ID
    assert {"grace", "model-editing", "peft"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "text-generation"
    assert "| `transformer.h.1.mlp.c_proj` | 2 | 2 |" in card.text  # layer, keys, edits seen
    assert "**2 keys** from **2 edits**" in card.text
    assert "`eps_init` (radius of a new key): 0.2" in card.text and "`replace_last`" in card.text
    snippet = card.text.split("```python", 1)[1].split("```", 1)[0]
    assert snippet.index("import grace_peft") < snippet.index('PeftModel.from_pretrained(base, "user/edits")')
    assert f'from_pretrained("{BASE_ID}")' in snippet
    for generic in ("library_name: transformers", "🤗 transformers model", "More Information Needed"):
        assert generic not in readme


def test_no_edit_text_is_published_by_default(hub, edited):
    tiny, model, reports = edited
    push_edits(model, "user/quiet", token=TOKEN, edits=reports)  # edits given, but include_edits is off

    files = hub.files("user/quiet")
    assert EDITS_FILE not in files
    commits = hub.repos["user/quiet"].commits.values()
    published = _all_text(files) + "\n".join(commit.summary + commit.description for commit in commits)
    for prompt, target in EDITS:
        assert prompt not in published and target not in published
    assert "not published" in files["README.md"].decode()
    assert "token ids" in files["README.md"].decode()  # ...and the card says what the codebook still holds


def test_include_edits_publishes_edits_jsonl_and_a_card_table(hub, edited):
    tiny, model, reports = edited
    push_edits(model, "user/open", token=TOKEN, include_edits=True, edits=reports)

    files = hub.files("user/open")
    lines = [json.loads(line) for line in files[EDITS_FILE].decode().splitlines()]
    assert lines == [{"prompt": prompt, "target": target} for prompt, target in EDITS]
    readme = files["README.md"].decode()
    for index, (prompt, target) in enumerate(EDITS):
        assert f"| {index} | {prompt} | {target} |" in readme
    with pytest.raises(ValueError, match="include_edits=True"):
        push_edits(model, "user/open", token=TOKEN, include_edits=True)


def test_private_revision_commit_message_and_token_reach_the_hub(hub, edited):
    tiny, model, _ = edited
    push_edits(model, "user/private", private=True, revision="experiments", commit_message="Add 2 GRACE edits",
               commit_description="zsRE batch 1", token=TOKEN)

    create = hub.requests_to("POST", "/api/repos/create")[0].json()
    assert (create["organization"], create["name"]) == ("user", "private")
    assert hub.repos["user/private"].private
    ours = [r for r in hub.requests if "user/private" in r.path or r.path in ("/api/repos/create",
                                                                              "/api/validate-yaml")]
    assert ours and {r.headers.get("authorization") for r in ours} == {f"Bearer {TOKEN}"}  # every one, any client
    assert hub.requests_to("POST", "/api/models/user/private/branch/experiments")
    repo = hub.repos["user/private"]
    head = repo.commits[repo.refs["experiments"]]
    assert (head.summary, head.description) == ("Add 2 GRACE edits", "zsRE batch 1")
    assert sorted(hub.files("user/private", "main")) == [".gitattributes"]  # main untouched
    assert 'PeftModel.from_pretrained(base, "user/private", revision="experiments")' in \
        hub.files("user/private", "experiments")["README.md"].decode()

    again = push_edits(model, "user/private", revision="experiments", token=TOKEN)  # the branch exists already
    assert again.oid == head.oid  # nothing changed, so no new commit
    with pytest.raises(ValueError, match="adapter_config.json"):  # private: without the token there is no repo
        PeftModel.from_pretrained(_base(tiny), "user/private", revision="experiments")
    assert "authorization" not in hub.requests[-1].headers
    pulled = PeftModel.from_pretrained(_base(tiny), "user/private", revision="experiments", token=TOKEN)
    _assert_same_model(pulled, model, tiny.tokenizer)


def test_create_pr_opens_a_pull_request_against_main(hub, edited):
    tiny, model, _ = edited
    push_edits(model, "user/shared", token=TOKEN)
    info = push_edits(model, "user/shared", token=TOKEN, include_edits=True, edits=EDITS, create_pr=True)

    assert info.pr_url and info.pr_revision == "refs/pr/1"
    assert EDITS_FILE in hub.files("user/shared", "refs/pr/1") and EDITS_FILE not in hub.files("user/shared")
    pulled = PeftModel.from_pretrained(_base(tiny), "user/shared", revision="refs/pr/1")
    _assert_same_model(pulled, model, tiny.tokenizer)
    before = len(hub.requests)
    with pytest.raises(ValueError, match="create_pr"):
        push_edits(model, "user/shared", token=TOKEN, create_pr=True, revision="experiments")
    assert len(hub.requests) == before  # refused before anything reached the Hub


def test_offline_pull_from_the_cache(hub, edited, monkeypatch):
    tiny, model, _ = edited
    push_edits(model, "user/edits", token=TOKEN)
    push_edits(model, "user/edits", token=TOKEN, revision="v2")
    for revision in (None, "v2"):
        PeftModel.from_pretrained(_base(tiny), "user/edits", revision=revision)  # fills the cache

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets when read at import
    before = len(hub.requests)
    pulled = PeftModel.from_pretrained(_base(tiny), "user/edits")
    assert len(hub.requests) == before  # offline: not even a HEAD request
    _assert_same_model(pulled, model, tiny.tokenizer)

    hub.stop()  # and with the Hub gone
    for revision in (None, "v2"):
        _assert_same_model(PeftModel.from_pretrained(_base(tiny), "user/edits", revision=revision), model,
                           tiny.tokenizer)


# ---------------------------------------------------------------------------------------------- model.push_to_hub
def test_model_push_to_hub_uploads_the_grace_card(hub, edited):
    tiny, model, _ = edited
    model.push_to_hub("user/via-peft", token=TOKEN, private=True, commit_message="via push_to_hub",
                      max_shard_size="1GB")

    readme = hub.files("user/via-peft")["README.md"].decode()
    assert ModelCard(readme).data.library_name == "peft" and "import grace_peft" in readme
    assert hub.repos["user/via-peft"].private
    repo = hub.repos["user/via-peft"]
    assert repo.commits[repo.refs["main"]].summary == "via push_to_hub"
    pulled = PeftModel.from_pretrained(_base(tiny), "user/via-peft", token=TOKEN)
    _assert_same_model(pulled, model, tiny.tokenizer)


def test_without_the_route_peft_would_upload_transformers_generic_card(hub, edited):
    tiny, model, _ = edited
    PeftModel.push_to_hub.grace_peft_original(model, "user/generic", token=TOKEN)
    assert ModelCard(hub.files("user/generic")["README.md"].decode()).data.library_name == "transformers"

    lora = get_peft_model(tiny.fresh(), LoraConfig(target_modules=["c_attn"], r=2, fan_in_fan_out=True))
    lora.push_to_hub("user/lora", token=TOKEN)  # other PEFT methods keep peft's behaviour
    readme = hub.files("user/lora")["README.md"].decode()
    assert ModelCard(readme).data.library_name == "transformers" and "grace" not in readme


# ---------------------------------------------------------------------------------------------- the card alone
def test_card_of_a_local_base_and_a_named_adapter(edited):
    tiny, _, _ = edited
    base = tiny.fresh()
    base.name_or_path = base.config._name_or_path = os.getcwd()  # loaded from a local folder
    config = GraceConfig(target_modules=[tiny.target], eps_init=0.5, replacement="replace_all", eps_expand="paper")
    model = get_peft_model(base, config, adapter_name="facts")

    card = ModelCard(model_card(model, "facts", repo_id="org/facts"))
    assert card.data.base_model is None and os.getcwd() not in card.content  # a local path is not published
    assert "| `transformer.h.1.mlp.c_proj` | 0 | 0 |" in card.text
    assert "`replace_all`" in card.text and "`paper`" in card.text and "0.5" in card.text
    assert 'PeftModel.from_pretrained(base, "org/facts", subfolder="facts", adapter_name="facts")' in card.text
    assert ModelCard(model_card(model, "facts", base_model=BASE_ID)).data.base_model == BASE_ID
    with pytest.raises(ValueError, match="No GRACE adapter named 'default'"):
        model_card(model)
    with pytest.raises(TypeError, match="PeftModel"):
        model_card(base)


# ---------------------------------------------------------------------------------------------- the real Hub
@pytest.mark.skipif(not (os.environ.get("HF_TOKEN") and os.environ.get("GRACE_PEFT_LIVE_HUB") == "1"),
                    reason="live Hub test: set HF_TOKEN and GRACE_PEFT_LIVE_HUB=1")
def test_live_hub_round_trip(tmp_path):
    tiny = tiny_gpt2()
    model, _ = _edit(tiny, tiny.fresh())  # no base_model in the card: the tiny model is not on the Hub
    api = huggingface_hub.HfApi()
    repo_id = f"{api.whoami()['name']}/grace-peft-live-test-{uuid.uuid4().hex[:8]}"
    try:
        push_edits(model, repo_id, private=True)
        assert ModelCard.load(repo_id).data.library_name == "peft"
        pulled = PeftModel.from_pretrained(tiny.fresh(), repo_id, cache_dir=str(tmp_path))
        _assert_same_model(pulled, model, tiny.tokenizer)
    finally:
        api.delete_repo(repo_id, missing_ok=True)
