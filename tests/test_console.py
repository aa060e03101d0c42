"""The edit console (`grace-peft console`): its actions on plain values, the command, and the page end to end in a
real headless browser (Debian's chromium driven by selenium) on a tiny random GPT-2.

The browser test skips only when gradio, selenium, chromium or chromedriver is missing; with
GRACE_PEFT_REQUIRE_BROWSER=1 (what `make test` sets when it can install them: as root with apt-get, as in CI) it
fails instead, so that CI cannot skip it silently.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import EDITS, FAR_PROMPT, TINY_MODELS, TinyModel, tiny_gpt2, wrap
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from peft import PeftModel

from grace_peft import GraceEditor
from grace_peft.apps import cli, console
from grace_peft.apps.console import Console

ROOT = Path(__file__).resolve().parent.parent
PROMPT, TARGET = EDITS[0]  # "the capital of australia is" -> "canberra": takes on the tiny GPT-2
NEW_TOKENS = 4
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WAIT_S = 30
# deprecation warnings from inside gradio (its use of pandas 3 and starlette)
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio")


# ---------------------------------------------------------------------------------------------- helpers
def unedited_answer(tiny: TinyModel, prompt: str) -> str:
    """The base model's greedy answer, computed without grace_peft: what the console must show for an unedited
    prompt."""
    ids = tiny.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = tiny.fresh().generate(**ids, do_sample=False, max_new_tokens=NEW_TOKENS,
                                       pad_token_id=tiny.tokenizer.pad_token_id)
    return tiny.tokenizer.decode(output[0, ids["input_ids"].shape[1]:].tolist(), skip_special_tokens=True)


def new_console(tiny: TinyModel, config: dict | None = None, **options) -> Console:
    model = wrap(tiny, **(config or {}))
    return Console(model, tiny.tokenizer, GraceEditor(model, tiny.tokenizer, progress=False),
                   max_new_tokens=NEW_TOKENS, **options)


def edit_id_of(message: str) -> int:
    match = re.match(r"Edit (\d+) took", message)
    assert match, f"no edit took: {message!r}"
    return int(match.group(1))


@pytest.fixture(scope="module")
def tiny() -> TinyModel:
    return tiny_gpt2()


# ---------------------------------------------------------------------------------------------- the actions
def test_ask_correct_undo_on_plain_values(tiny):
    shell = new_console(tiny)
    original = unedited_answer(tiny, PROMPT)
    assert not original.startswith(TARGET)

    asked = shell.ask(PROMPT)
    assert (asked.answer, asked.error) == (original, False)
    assert "no edit fired" in asked.trace and "codebook is empty" in asked.trace

    corrected = shell.correct(PROMPT, TARGET)
    edit_id = edit_id_of(corrected.message)
    assert not corrected.error and corrected.answer.split()[0] == TARGET
    assert f"edit {edit_id} fired ('{TARGET}', distance" in corrected.trace
    assert corrected.edits == [[edit_id, PROMPT, TARGET, "add", "yes", corrected.edits[0][5]]]

    far = shell.ask(FAR_PROMPT)  # far from the edit: unchanged, and the trace says how far
    assert far.answer == unedited_answer(tiny, FAR_PROMPT)
    assert f"no edit fired (nearest: edit {edit_id} ('{TARGET}', distance" in far.trace

    undone = shell.undo(str(edit_id), PROMPT)
    assert not undone.error and f"Edit {edit_id} taken back" in undone.message
    assert undone.answer == original and "no edit fired" in undone.trace
    assert undone.edits == []


def test_a_subject_gated_adapter_takes_the_subject_from_the_page(tiny):
    shell = new_console(tiny, {"subject_gate": True, "eps_init": 50.0})
    refused = shell.correct(PROMPT, TARGET)
    assert refused.error and "names none" in refused.message
    subject = PROMPT.split()[-2]  # "australia" in "the capital of australia is"
    corrected = shell.correct(PROMPT, TARGET, subject)
    edit_id = edit_id_of(corrected.message)
    assert corrected.answer.split()[0] == TARGET and f"edit {edit_id} fired" in corrected.trace
    other = PROMPT.replace(subject, "france")  # the same wording about another subject
    assert shell.ask(other).answer == unedited_answer(tiny, other)
    assert "its subject is not in the prompt" in shell.ask(other).trace


@pytest.mark.parametrize(("action", "arguments", "expected"), [
    ("ask", ("  ",), "Type a prompt"),
    ("correct", ("", TARGET), "Type the prompt"),
    ("correct", (PROMPT, " "), "Type the correct answer"),
    ("undo", ("", PROMPT), "Give the id of an edit to undo (a whole number; this adapter holds no edits), got ''"),
    ("undo", ("first", PROMPT), "got 'first'"),
    ("undo", ("7", PROMPT), "Nothing undone: Edit 7 is not in this adapter's journal"),
    ("save", ("",), "Type the folder"),
])
def test_bad_input_is_a_message_not_an_exception(tiny, action, arguments, expected):
    reply = getattr(new_console(tiny), action)(*arguments)
    assert reply.error and expected in reply.message
    assert (reply.answer, reply.trace, reply.edits) == (None, None, None)  # the page keeps what it showed


def test_an_edit_the_model_already_makes_is_reported_and_not_applied(tiny):
    shell = new_console(tiny, {"skip_if_correct": True})
    already = unedited_answer(tiny, PROMPT).split()[0]
    reply = shell.correct(PROMPT, already)
    assert not reply.error and "Not edited: the model already answers" in reply.message
    assert reply.edits == [] and shell.editor.num_keys() == 0


def test_save_writes_an_adapter_that_loads_with_the_edit(tiny, tmp_path):
    shell = new_console(tiny, adapter_folder=str(tmp_path / "default"))
    assert shell.adapter_folder == str(tmp_path / "default")
    edit_id_of(shell.correct(PROMPT, TARGET).message)
    folder = tmp_path / "saved"
    reply = shell.save(str(folder))
    assert not reply.error and f"Adapter saved to {folder} (1 edit, 1 codebook key)" in reply.message
    again = Console(loaded := PeftModel.from_pretrained(tiny.fresh(), str(folder)), tiny.tokenizer,
                    GraceEditor(loaded, tiny.tokenizer, progress=False), max_new_tokens=NEW_TOKENS)
    assert again.ask(PROMPT).answer.split()[0] == TARGET

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    failed = shell.save(str(blocked / "inside"))
    assert failed.error and failed.message.startswith("Not saved: ")


def test_without_a_journal_the_page_says_edits_cannot_be_undone(tiny):
    shell = new_console(tiny, {"journal_limit": 0})
    assert "no journal" in shell.header()
    edit_id = edit_id_of(shell.correct(PROMPT, TARGET).message)
    undone = shell.undo(str(edit_id), PROMPT)
    assert undone.error and "Nothing undone" in undone.message and shell.editor.num_keys() == 1


def test_a_classifier_is_refused():
    bert = TINY_MODELS["bert"]()
    model = wrap(bert)
    with pytest.raises(ValueError, match="needs a causal or seq2seq LM"):
        Console(model, bert.tokenizer, GraceEditor(model, bert.tokenizer, progress=False))


def test_without_gradio_the_page_says_how_to_install_it(tiny, monkeypatch):
    model = wrap(tiny)
    editor = GraceEditor(model, tiny.tokenizer, progress=False)
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now fails as when it is not installed
    with pytest.raises(console.ConsoleUnavailable, match=re.escape('pip install "grace-peft[console]"')):
        console.build_app(model, tiny.tokenizer, editor)


# ---------------------------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def model_folder(tiny, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("console") / "model"
    tiny.fresh().save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return str(folder)


def test_command_without_gradio_exits_2_with_the_install_hint(model_folder, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)
    assert cli.main(["console", model_folder]) == 2
    assert 'pip install "grace-peft[console]"' in capsys.readouterr().err


def test_command_serves_the_adapter_it_loads(tiny, model_folder, tmp_path, monkeypatch, capsys):
    pytest.importorskip("gradio")
    adapter = tmp_path / "adapter"
    code = cli.main(["edit", model_folder, str(write_edit(tmp_path)), "--output", str(adapter), "--no-progress",
                     "--target-modules", tiny.target, "--eps-init", str(tiny.eps_init)])
    assert code == 0
    served = {}
    monkeypatch.setattr(console, "serve", lambda model, tokenizer, editor, **options: served.update(
        editor=editor, answer=Console(model, tokenizer, editor, max_new_tokens=NEW_TOKENS).ask(PROMPT), **options))
    assert cli.main(["console", model_folder, str(adapter), "--port", "7999", "--max-new-tokens", "5"]) == 0
    assert served["adapter_folder"] == str(adapter) and (served["port"], served["host"]) == (7999, "127.0.0.1")
    assert served["max_new_tokens"] == 5 and served["editor"].num_keys() == 1
    assert served["answer"].answer.split()[0] == TARGET and "edit 0 fired" in served["answer"].trace

    # a new adapter takes the target options; an adapter's own configuration refuses them
    assert cli.main(["console", model_folder, "--layer", "1", "--eps-init", "0.5", "-o", str(tmp_path / "new")]) == 0
    assert served["adapter_folder"] == str(tmp_path / "new") and served["editor"].num_keys() == 0
    assert served["editor"].config.eps_init == 0.5
    assert cli.main(["console", model_folder, str(adapter), "--eps-init", "0.5"]) == 2
    assert "drop --eps-init" in capsys.readouterr().err


def test_command_serves_the_page_until_ctrl_c(model_folder):
    """The installed command in its own process: the page is served on the port asked for, and Ctrl-C stops it with
    exit code 0."""
    pytest.importorskip("gradio")
    port = free_port()
    script = Path(sys.executable).with_name("grace-peft")
    process = subprocess.Popen([str(script), "console", model_folder, "--port", str(port), "--eps-init", "0.2"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    page = response.read().decode()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "the console did not start"
                time.sleep(0.5)
        assert "GRACE edit console" in page
        ready = f"GRACE edit console on http://127.0.0.1:{port}/ (Ctrl-C to stop)"
        lines = iter(process.stdout.readline, "")
        assert any(line.startswith(ready) for line in lines), "the console never said where it serves"
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_edit(folder: Path) -> Path:
    path = folder / "edits.jsonl"
    path.write_text(f'{{"prompt": "{PROMPT}", "target": "{TARGET}"}}\n', encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- install
def test_console_extra_is_pinned_at_its_lower_bound_and_tested_by_both_locks():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (gradio,) = [Requirement(line) for line in extras["console"]]
    selenium = next(Requirement(line) for line in extras["test"] if line.startswith("selenium"))

    def pins(lock: str) -> dict[str, Version]:
        lines = (ROOT / "requirements" / lock).read_text().splitlines()
        return {canonicalize_name(line.partition("==")[0]): Version(line.partition("==")[2])
                for line in lines if line and not line.startswith("#")}

    lowest, locked = pins("lowest.txt"), pins("lock.txt")
    assert lowest["gradio"] == Version(str(gradio.specifier).removeprefix(">="))
    assert gradio.specifier.contains(locked["gradio"])
    assert selenium.specifier.contains(lowest["selenium"]) and selenium.specifier.contains(locked["selenium"])


# ---------------------------------------------------------------------------------------------- the page
def missing_for_the_browser_test() -> list[str]:
    missing = [name for name in ("gradio", "selenium") if importlib.util.find_spec(name) is None]
    if not any(shutil.which(name) for name in BROWSERS):
        missing.append("chromium")
    if not shutil.which("chromedriver"):
        missing.append("chromedriver")
    return missing


@pytest.fixture
def page(tiny, monkeypatch):
    """The console of a fresh tiny GPT-2, served on a free port and opened in headless chromium; ``(driver, url,
    console)``. Server and browser are closed after the test."""
    missing = missing_for_the_browser_test()
    if missing:
        reason = (f"the browser test needs {', '.join(missing)} (pip install -e '.[test,console]'; Debian: apt-get "
                  "install chromium chromium-driver)")
        if os.environ.get("GRACE_PEFT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason}; GRACE_PEFT_REQUIRE_BROWSER=1 requires it to run")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    model = wrap(tiny)
    editor = GraceEditor(model, tiny.tokenizer, progress=False)
    app = console.build_app(model, tiny.tokenizer, editor, max_new_tokens=NEW_TOKENS)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, ssr_mode=False,
               quiet=True)
    options = Options()
    options.binary_location = next(shutil.which(name) for name in BROWSERS if shutil.which(name))
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1300",
                     "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    try:
        driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    except Exception:
        app.close()
        raise
    try:
        yield driver, f"http://127.0.0.1:{port}/", editor
    finally:
        driver.quit()
        app.close()


class Page:
    """The console page as a user sees it."""

    def __init__(self, driver) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.by, self.wait = driver, By, WebDriverWait(driver, WAIT_S)

    def element(self, css: str):
        return self.wait.until(lambda driver: driver.find_element(self.by.CSS_SELECTOR, css))

    def type(self, field: str, text: str) -> None:
        box = self.element(f"#{field} textarea")
        box.clear()
        box.send_keys(text)

    def click(self, button: str) -> None:
        self.element(f"#{button}").click()

    def value(self, field: str) -> str:
        return self.element(f"#{field} textarea").get_property("value")

    def text(self, element: str) -> str:
        """The element's visible text, its white space collapsed."""
        return " ".join(self.element(f"#{element}").text.split())

    def cell(self, table: str, text: str):
        """The first visible cell of ``table`` that shows ``text`` (gradio 6.2 draws td cells, later releases
        gridcell divs)."""
        def find(driver):
            cells = driver.find_elements(self.by.CSS_SELECTOR, f"#{table} [role=gridcell], #{table} td")
            return next((cell for cell in cells if cell.is_displayed() and cell.text.strip() == text), False)

        return self.wait.until(find)

    def until(self, condition, what: str) -> None:
        """Wait for ``condition()`` to hold; fail with what the page shows."""
        from selenium.common.exceptions import TimeoutException

        try:
            self.wait.until(lambda _: condition())
        except TimeoutException:
            pytest.fail(f"the page never showed {what}; it shows answer {self.value('answer')!r}, trace "
                        f"{self.value('trace')!r}, message {self.text('message')!r}")


def test_page_ask_correct_see_the_trace_undo_save(page, tiny, tmp_path):
    driver, url, editor = page
    original = unedited_answer(tiny, PROMPT)
    driver.get(url)
    view = Page(driver)
    assert "GRACE at transformer.h.1.mlp.c_proj" in view.text("header")

    # ask: the model's own answer, and no edit fired
    view.type("prompt", PROMPT)
    view.click("ask")
    view.until(lambda: view.value("answer") == original, f"the original answer {original!r}")
    assert "no edit fired" in view.value("trace")

    # correct it: an edit; the page asks again and shows the corrected answer and the edit that fired
    view.type("target", TARGET)
    view.click("correct")
    view.until(lambda: view.text("message").startswith("Edit "), "the edit's outcome")
    edit_id = edit_id_of(view.text("message"))
    view.until(lambda: view.value("answer").split()[:1] == [TARGET], f"the corrected answer {TARGET!r}")
    assert f"edit {edit_id} fired ('{TARGET}', distance" in view.value("trace")
    view.until(lambda: PROMPT in view.text("edits") and TARGET in view.text("edits"), "the edit in the table")
    assert editor.num_keys() == 1

    # an id the adapter does not hold: a message, no traceback, nothing changes
    view.type("edit-id", str(edit_id + 41))
    view.click("undo")
    view.until(lambda: "Nothing undone" in view.text("message"), "the unknown id refused")
    assert f"Edit {edit_id + 41} is not in this adapter's journal" in view.text("message")
    assert "Traceback" not in driver.page_source and editor.num_keys() == 1

    # save: an adapter folder that loads with the edit
    folder = tmp_path / "saved"
    view.type("folder", str(folder))
    view.click("save")
    view.until(lambda: "Adapter saved to" in view.text("message"), "the adapter saved")
    assert (folder / "adapter_config.json").is_file()
    if screenshot := os.environ.get("GRACE_PEFT_CONSOLE_SCREENSHOT"):
        driver.save_screenshot(screenshot)

    # undo: a click on the edit's row picks its id; then the original answer again, and no edit fires
    view.cell("edits", str(edit_id)).click()
    view.until(lambda: view.value("edit-id") == str(edit_id), f"edit id {edit_id} picked from the table")
    view.click("undo")
    view.until(lambda: f"Edit {edit_id} taken back" in view.text("message"), "the edit taken back")
    view.until(lambda: view.value("answer") == original, f"the original answer {original!r} again")
    assert "no edit fired" in view.value("trace") and editor.num_keys() == 0
    view.until(lambda: PROMPT not in view.text("edits"), "the edit gone from the table")
