"""The web UI in a real browser: headless Chromium (Debian `chromium`) driven by Playwright.

One test clicks through the quickstart as a new user would: open the page, load the quickstart config, switch to
the tiny built-in model, preview a row, start training, watch the loss curve and progress, stop (a checkpoint),
restart the UI and see the page reattach, resume, let it finish, compare base and adapter, chat with the adapter next to the base model,
export a GGUF, and switch to Chinese. Screenshots of each page go to $LORAFORGE_SCREENSHOTS (default
tests/artifacts/webui). Any browser console error fails the test.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("LORAFORGE_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("LORAFORGE_SCREENSHOTS", REPO / "tests" / "artifacts" / "webui"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

playwright_sync = pytest.importorskip("playwright.sync_api", reason="pip install playwright (in the dev extra)")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                       reason=f"no Chromium at {CHROMIUM}: apt-get install chromium fonts-noto-cjk "
                       "(or set LORAFORGE_CHROMIUM)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UiServer:
    """`loraforge webui` as a user starts it, in a project folder holding the examples."""

    def __init__(self, project: Path):
        self.project = project
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "UiServer":
        env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "loraforge.cli", "webui", "--port", str(self.port)],
                                     cwd=self.project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.proc.stdout.read().decode()) from None
                time.sleep(0.2)
        raise RuntimeError("the web UI did not start within 120 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


def _job_state(page, selector: str, wanted: str, timeout_s: float) -> None:
    page.wait_for_function(
        "([sel, want]) => document.querySelector(sel).className.includes(want)", arg=[selector, wanted],
        timeout=timeout_s * 1000)


def _step(page) -> int:
    return int(page.locator("#stat-step").inner_text() or 0)


def _compare(page) -> None:
    page.click("#form details:has(#f-max_new_tokens) > summary")
    page.fill("#f-max_new_tokens", "8")
    page.dispatch_event("#f-max_new_tokens", "change")
    page.click("[data-tab=eval]")
    page.click("#ev-compare")
    _job_state(page, "#ev-state", "finished", 300)
    page.wait_for_selector("#ev-results table")
    page.wait_for_function("document.querySelector('#ev-chart')?.naturalWidth > 0")
    assert "bleu-4" in page.inner_text("#ev-results")
    page.screenshot(path=str(SHOTS / "eval.png"), full_page=True)


def test_quickstart_in_a_real_browser(tmp_path, tiny_qwen3_path):
    project = tmp_path / "project"
    shutil.copytree(REPO / "examples", project / "examples")
    SHOTS.mkdir(parents=True, exist_ok=True)
    server = UiServer(project).start()
    errors: list[str] = []
    try:
        with playwright_sync.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(90_000)  # a busy 2-core machine loads torch in a fresh process slowly
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url)
            page.wait_for_selector("body[data-ready]")

            # a config with a typo: the CLI's message is on the page, and the key can be removed there
            typo = (project / "examples" / "quickstart.yaml").read_text() + "lora_rnak: 4\n"
            (project / "examples" / "typo.yaml").write_text(typo)
            page.fill("#config-path", "examples/typo.yaml")
            page.click("#load")
            page.wait_for_function("document.querySelector('#problems').textContent.includes('unknown key `lora_rnak`')")
            assert "did you mean lora_rank" in page.inner_text("#problems")
            page.click("#extras button.remove")
            page.wait_for_selector("#problems li.good")

            # config: the quickstart YAML, then the tiny model, a long max_steps to have time to stop
            page.fill("#config-path", "examples/quickstart.yaml")
            page.click("#load")
            page.wait_for_function("document.querySelector('#command').textContent.includes('quickstart.yaml')")
            page.fill("#top [data-key=model_name_or_path]", "tiny-random-qwen3")
            page.dispatch_event("#top [data-key=model_name_or_path]", "change")
            page.select_option("#quick-template", '"qwen3"')
            for key, value in (("max_steps", "400"), ("logging_steps", "1"), ("output_dir", "saves/quick"),
                               ("per_device_train_batch_size", "2"), ("cutoff_len", "48"), ("save_steps", "1000")):
                page.fill(f"#f-{key}", value)
                page.dispatch_event(f"#f-{key}", "change")
            page.wait_for_function("document.querySelector('#command').textContent.includes('model_name_or_path="
                                   "tiny-random-qwen3')")
            assert page.locator("#f-model_name_or_path").input_value() == "tiny-random-qwen3"  # one store, two inputs
            page.wait_for_selector("#problems li.good")

            # data: a rendered row with its trained tokens highlighted
            page.click("[data-tab=data]")
            page.wait_for_selector("#datasets table")
            page.fill("#pv-index", "2")
            page.click("#pv-go")
            page.wait_for_selector("#pv-out mark.trained", timeout=60_000)
            assert "example 2 of quickstart" in page.inner_text("#pv-head")
            page.screenshot(path=str(SHOTS / "data.png"), full_page=True)

            # train: start, see the curve and progress move, stop with a checkpoint
            page.click("[data-tab=train]")
            page.click("#train-start")
            page.wait_for_function("Number(document.querySelector('#stat-step')?.textContent) >= 3", timeout=120_000)
            assert page.locator("#loss-chart polyline.loss").count() == 1
            assert re.match(r"\d+:\d\d:\d\d", page.inner_text("#stat-eta"))
            first = _step(page)
            page.wait_for_function(f"Number(document.querySelector('#stat-step').textContent) > {first}")
            page.screenshot(path=str(SHOTS / "train.png"), full_page=True)
            page.click("#train-stop")
            _job_state(page, "#train-state", "stopped", 60)
            stopped_at = _step(page)
            assert list((project / "saves" / "quick").glob("checkpoint-*"))

            # resume a few more steps; restart the UI meanwhile: the page reattaches to the running job
            page.fill("#f-max_steps", str(stopped_at + 6))
            page.dispatch_event("#f-max_steps", "change")
            page.click("#train-resume")
            _job_state(page, "#train-state", "running", 30)
            before_restart = len(errors)
            server.stop()
            page.wait_for_function(  # the page polls every second: it sees the UI down, says so, and retries
                "document.querySelector('#train-error').textContent.includes('not reachable')")
            server.start()
            page.reload()
            page.wait_for_selector("body[data-ready]")
            # a poll that found the UI down is logged by Chromium itself; that one is expected, nothing else
            errors[before_restart:] = [e for e in errors[before_restart:] if "ERR_CONNECTION_REFUSED" not in e]
            page.wait_for_function("document.querySelector('#train-state').textContent.includes('train')")
            _job_state(page, "#train-state", "finished", 180)
            assert _step(page) == stopped_at + 6
            assert (project / "saves" / "quick" / "adapter_model.safetensors").is_file()

            # evaluate: base vs adapter on the eval set (short answers keep it quick); two more model loads and
            # 80 generations, so only when asked (LORAFORGE_WEBUI_FULL=1, e.g. to remake the README screenshots)
            if os.environ.get("LORAFORGE_WEBUI_FULL") == "1":
                _compare(page)

            # chat: base and fine-tuned side by side, streamed
            page.click("[data-tab=chat]")
            page.click("#ch-load-base")
            page.wait_for_function("document.querySelector('#ch-base-name').textContent.includes('tiny')", timeout=60_000)
            page.click("#ch-load-adapter")
            page.wait_for_function("document.querySelector('#ch-adapter-name').textContent.includes('quick')",
                                   timeout=60_000)
            page.fill("#ch-max", "8")
            page.fill("#ch-input", "你好，介绍一下你自己")
            page.click("#ch-send")
            page.wait_for_selector("#ch-base .msg.assistant[data-done]", timeout=60_000)
            page.wait_for_selector("#ch-adapter-log .msg.assistant[data-done]", timeout=60_000)
            assert "你好" in page.inner_text("#ch-base .msg.user")
            page.screenshot(path=str(SHOTS / "chat.png"), full_page=True)

            # export: a q8_0 GGUF and an Ollama Modelfile
            page.click("[data-tab=export]")
            page.select_option("#ex-format", "gguf")
            page.select_option("#ex-quant", "q8_0")
            page.click("#ex-go")
            _job_state(page, "#ex-state", "finished", 180)
            page.wait_for_selector("#ex-files td")
            files = page.inner_text("#ex-files")
            assert ".gguf" in files and "Modelfile" in files
            page.screenshot(path=str(SHOTS / "export.png"), full_page=True)

            # Chinese, switched at any time
            page.click("#lang")
            assert page.inner_text("[data-tab=train]") == "训练"
            page.click("[data-tab=train]")
            page.screenshot(path=str(SHOTS / "train_zh.png"), full_page=True)
            page.click("#lang")
            assert page.inner_text("[data-tab=train]") == "Train"
            browser.close()
    finally:
        server.stop()
    assert errors == [], f"browser console errors: {errors}"
