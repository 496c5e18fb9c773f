"""The UI's tests' fixtures and helpers: `stylelora ui` in a process of its own, headless Chromium
(the system's, through Playwright: nothing downloads a browser), screenshots, a run's settings.

A plugin of the suite (`pytest_plugins` in conftest.py) rather than a second conftest.py, which
would take the name `conftest` that other tests import their helpers by."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# STYLELORA_UI_SCREENSHOTS=samples/ui pytest tests/ui: the README's screenshots, refreshed
SCREENSHOTS = os.environ.get("STYLELORA_UI_SCREENSHOTS")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class UIServer:
    """`stylelora ui` on a free port, over `root`, keeping its database in `data`."""

    def __init__(self, root: Path, data: Path, host: str = "127.0.0.1", token: str | None = None,
                 env: dict[str, str] | None = None):  # fmt: skip
        self.root, self.data, self.host, self.token = root, data, host, token
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.log = root / f"ui-{self.port}.log"

    def start(self) -> UIServer:
        command = [sys.executable, "-m", "stylelora", "ui", "--root", str(self.root)]
        command += ["--port", str(self.port), "--data", str(self.data), "--host", self.host]
        if self.token:
            command += ["--token", self.token]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.root, stdout=log, stderr=log, env=self.env
            )
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the UI exited: {self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"the UI did not start: {self.log.read_text()}")

    def stop(self, end_runs: bool = True) -> None:
        """As Ctrl-C on its terminal would; then, unless told otherwise, the runs it started,
        which outlive it by design, are ended too (a test's long run would go on using the
        cores)."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        for pid in processes_under(self.root) if end_runs else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def call(self, method: str, path: str, body: dict | bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict]:  # fmt: skip
        """A request as a script would make it: the token in its header unless `headers` say
        otherwise. `body`: JSON, or bytes sent as they are."""
        sent = {"Content-Type": "application/json"}
        if self.token:
            sent["X-Stylelora-Token"] = self.token
        sent.update(headers or {})
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url(path), data=data, method=method, headers=sent)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, reply_of(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, reply_of(exc.read())

    def wait_for(self, run_id: int, done, timeout: float = 180) -> dict:
        """The run's summary once `done(summary)` holds."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            _, runs = self.call("GET", "/api/runs")
            run = next(r for r in runs["runs"] if r["id"] == run_id)
            if done(run):
                return run
            time.sleep(0.3)
        log = (Path(run["output_dir"]) / "train.log").read_text(errors="replace")[-2000:]
        raise AssertionError(f"run {run_id} never got there: {run}\n{log}")


def processes_under(root: Path) -> list[int]:
    """The `stylelora` processes (runs, renders, tools; not a UI, which another test may be
    using over the same root) whose command names a path in `root`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        command = args[args.index("stylelora") + 1 :] if "stylelora" in args else ["ui"]
        if command[:1] != ["ui"] and any(arg.startswith(f"{root}/") for arg in command):
            found.append(int(cmdline.parent.name))
    return found


def reply_of(data: bytes) -> dict:
    """A JSON reply; a page, a file or an image as {"bytes": ...}."""
    try:
        reply = json.loads(data or b"{}")
    except ValueError:
        return {"bytes": data}
    return reply if isinstance(reply, dict) else {"json": reply}


def server_over_demo_style(tmp_path_factory, name: str) -> UIServer:
    """A started UI (its token `t`) over a fresh root that holds a copy of the demo's style
    set as `style/`."""
    root = tmp_path_factory.mktemp(name)
    shutil.copytree(ROOT / "datasets" / "demo-style", root / "style",
                    ignore=shutil.ignore_patterns(".*"))  # fmt: skip
    return UIServer(root, root / ".ui", token="t").start()


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """A root holding a copy of the demo's style set and its sample prompts."""
    root = tmp_path_factory.mktemp("ui-root")
    shutil.copytree(ROOT / "datasets" / "demo-style", root / "style",
                    ignore=shutil.ignore_patterns(".*"))  # fmt: skip
    shutil.copy(ROOT / "samples" / "demo-prompts.txt", root / "prompts.txt")
    return root


@pytest.fixture(scope="session")
def server(workspace: Path):
    ui = UIServer(workspace, workspace / ".ui", token="local-token").start()
    yield ui
    ui.stop()


@pytest.fixture(scope="session")
def browser():
    executable = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if executable is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors
    yield page
    context.close()


def screenshot(page, name: str, tmp_path: Path) -> Path:
    folder = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path))
    return path


# A short run of the demo: the shipped demo base, 64 px, batch 1
def run_settings(name: str, steps: int, **extra: str) -> dict[str, str]:
    return {
        "name": name,
        "model": "demo:sd15",
        "output_dir": f"runs/{name}",
        "data.dir": "style",
        "data.resolution": "64",
        "train.max_steps": str(steps),
        "train.learning_rate": "1e-3",
        "validation.measure": "false",  # the run page's `watched` run measures
        **extra,
    }
