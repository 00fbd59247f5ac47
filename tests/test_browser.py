"""JupyterLab and the report page as people open them: in a real headless Chromium, driven by Playwright.

- Every notebook of notebooks/ is opened in JupyterLab (started headless on a free local port, on a
  copy of the notebooks so that the page's runs and saves stay out of the checkout); its parameters
  cell and the next one are run from the page with Shift+Enter. The kernel must be `glad`, the two
  cells must run in order without an error output. A screenshot per notebook goes to the test's
  temporary folder.
- The report page (`report.html`, written by `glad_core.jobs.report`) is opened from the file system:
  it must request nothing but itself (it opens offline), and its tables and embedded figures must
  render, with the numbers of the record it reports.

Chromium is Debian's `chromium` (Playwright's own browser downloads are not used); the tests skip
where it is not installed (`make test` installs it where apt-get runs as root). Set
GLAD_UPDATE_SCREENSHOT=1 to copy the report page's screenshot to docs/report.png (the README's).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
SMOKE = ROOT / "params" / "smoke" / "base_to_novel.yaml"
DOCS_SCREENSHOT = ROOT / "docs" / "report.png"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# JupyterLab's objects, exposed by --LabApp.expose_app_in_browser
PANEL = "jupyterapp.shell.currentWidget"
KERNEL = f"{PANEL}.sessionContext.session.kernel"
STARTUP_S = 180  # JupyterLab or a kernel starting on a loaded 2-core machine
pytestmark = pytest.mark.browser


def chromium() -> str | None:
    """Debian's Chromium, when installed."""
    found = shutil.which("chromium") or "/usr/bin/chromium"
    return found if os.access(found, os.X_OK) else None


@pytest.fixture(scope="module")
def browser() -> Iterator:
    exe = chromium()
    if exe is None:
        pytest.skip("no Chromium installed: apt-get install chromium (make test installs it when run as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS)
        yield b
        b.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Lab:
    """A running JupyterLab: its base URL, token and root folder (a copy of notebooks/ in `root/notebooks`)."""

    base: str
    token: str
    root: Path

    def url(self, path: str) -> str:
        return f"{self.base}/{path}?token={self.token}"


def _state_env(state: Path) -> dict[str, str]:
    """The environment of the server and its kernels: Jupyter / IPython / matplotlib state in `state`,
    this checkout first on the path, matplotlib's backend left to the kernel (inline figures)."""
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env.update(JUPYTER_CONFIG_DIR=str(state / "config"), JUPYTER_DATA_DIR=str(state / "data"),
               JUPYTER_RUNTIME_DIR=str(state / "runtime"), IPYTHONDIR=str(state / "ipython"),
               MPLCONFIGDIR=str(state / "matplotlib"),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    # no "official Jupyter news?" prompt over the screenshots
    settings = state / "config" / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    return env


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("glad")
    except NoSuchKernel:
        pytest.fail(f"the notebooks' kernel 'glad' is not installed: {sys.executable} -m ipykernel install "
                    f"--prefix {sys.prefix} --name glad (make install does it)")
    root = tmp_path_factory.mktemp("lab")
    shutil.copytree(NOTEBOOK_DIR, root / "notebooks")
    port, token = _free_port(), secrets.token_hex(16)
    log = (root / "jupyterlab.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
         "--LabApp.expose_app_in_browser=True", "--ServerApp.allow_root=True"],
        env=_state_env(root / "state"), stdout=log, stderr=subprocess.STDOUT)
    lab = Lab(f"http://127.0.0.1:{port}", token, root)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not start (exit code {proc.poll()}):\n"
                            f"{(root / 'jupyterlab.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(lab.url("api/status"), timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        yield lab
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


NOTEBOOKS = sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb"))
CELLS = f"{PANEL}.content.widgets"


def _parameters_index(name: str) -> int:
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    [index] = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    return index


def _kernel_idle(page, first: int) -> None:
    page.wait_for_function(f"() => window.jupyterapp && {PANEL} && {PANEL}.sessionContext?.session?.kernel"
                           f"?.status === 'idle'", timeout=STARTUP_S * 1000)


def _run_two_cells(page, first: int) -> None:
    """Select the parameters cell as a user does (its prompt: command mode) and press Shift+Enter twice."""
    page.locator(f"#{page.evaluate(f'{PANEL}.id')} .jp-Cell").nth(first).locator(".jp-InputPrompt").click()
    page.keyboard.press("Shift+Enter")  # runs it and selects the next cell
    page.keyboard.press("Shift+Enter")


def _ran(page, first: int) -> dict:
    """Once both cells ran: the kernel, its label in the toolbar, the cells' counts and outputs, the stderr shown."""
    page.wait_for_function(f"() => {CELLS}[{first + 1}].model.executionCount !== null && {KERNEL}.status === 'idle'",
                           timeout=STARTUP_S * 1000)
    panel = page.locator(f"#{page.evaluate(f'{PANEL}.id')}")
    return {"kernel": page.evaluate(f"{KERNEL}.name"),
            "label": panel.locator(".jp-NotebookPanel-toolbar .jp-KernelName").inner_text(),
            "cells": page.evaluate(f"[{first}, {first + 1}].map(i => ({{count: {CELLS}[i].model.executionCount, "
                                   f"outputs: {CELLS}[i].model.outputs.toJSON()}}))"),
            "stderr": panel.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
                                    ).all_inner_texts()}


@pytest.fixture(scope="module")
def opened(browser, lab, tmp_path_factory) -> dict[str, dict | Exception]:
    """Every notebook opened in a page of its own (its own JupyterLab workspace), each step taken on every
    page before the next, so the kernels start and run at the same time; per notebook what `_ran` gives
    and its screenshot (`shot`), or the exception that stopped it."""
    shots = tmp_path_factory.mktemp("screenshots")
    first = {name: _parameters_index(name) for name in NOTEBOOKS}
    pages = {name: browser.new_page(viewport={"width": 1280, "height": 900}) for name in NOTEBOOKS}
    out: dict[str, dict | Exception] = {}
    try:
        for name, page in pages.items():
            page.goto(lab.url(f"lab/workspaces/{name}/tree/notebooks/{name}.ipynb"), wait_until="commit")
        for step in (_kernel_idle, _run_two_cells, _ran):
            for name, page in pages.items():
                if not isinstance(out.get(name), Exception):
                    try:
                        out[name] = step(page, first[name])
                    except Exception as e:  # reported by this notebook's test
                        out[name] = e
        for name, page in pages.items():
            if not isinstance(out[name], Exception):
                out[name]["shot"] = shots / f"{name}.png"
                page.screenshot(path=out[name]["shot"])
    finally:
        for page in pages.values():
            if page.evaluate(f"() => !!(window.jupyterapp && {PANEL}?.sessionContext)"):
                page.evaluate(f"{PANEL}.sessionContext.shutdown()")  # frees the kernel's memory
            page.close()
    return out


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_jupyterlab(name, opened):
    r = opened[name]
    if isinstance(r, Exception):
        raise r
    first = _parameters_index(name)
    assert r["kernel"] == "glad" and "glad" in r["label"], f"{name} opened with kernel {r['kernel']!r} ({r['label']!r})"
    ran = r["cells"]
    assert [c["count"] for c in ran] == [1, 2], f"{name}: cells {first} and {first + 1} did not run in order: {ran}"
    errors = [f"{o['ename']}: {o['evalue']}" for c in ran for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"{name}: error output in the page: {errors}"
    assert any(o["output_type"] == "stream" and o["name"] == "stdout" for o in ran[1]["outputs"]), \
        f"{name}: the cell after the parameters printed nothing: {ran[1]['outputs']}"
    for text in r["stderr"]:  # printed warnings: shown in red, but not an error output
        warnings.warn(f"{name}: stderr shown in JupyterLab: {text.strip()[:300]}")
    assert r["shot"].stat().st_size > 0


# ----------------------------------------------------------------------------- the report page


@pytest.fixture(scope="module")
def report_page(tmp_path_factory) -> tuple[Path, dict]:
    """The report of one zero-shot smoke record (glad-mini, Tux Paint): its report.html and the record."""
    from glad_core import jobs as J, params, report

    try:
        from glad_core.debian import DemoDataUnavailable
        from glad_core.prepare import prepare_demo_data

        prepare_demo_data(names=["tuxpaint"])
    except DemoDataUnavailable as e:
        pytest.skip(f"demo data unavailable here: {e}")
    results = tmp_path_factory.mktemp("results")
    [cell] = params.cells(params.load(SMOKE, results_dir=str(results), methods=["zeroshot"]))
    report.run_grid([cell], progress=False)
    state = tmp_path_factory.mktemp("state")
    with pytest.MonkeyPatch.context() as mp:  # the report kernel's state out of the home folder
        for key in ("IPYTHONDIR", "MPLCONFIGDIR", "JUPYTER_CONFIG_DIR"):
            mp.setenv(key, str(state / key.lower()))
        md = J.report(results)
    return md.with_name("report.html"), json.loads(cell.record_path.read_text())


def test_report_page_is_self_contained_and_renders(browser, report_page, tmp_path):
    html, record = report_page
    figures = sorted(p.name for p in html.parent.glob("*.png"))  # written by the report notebook
    assert figures, "the report wrote no figure"
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(html.as_uri())
    page.wait_for_load_state("load")
    imgs = page.evaluate("[...document.images].map(i => ({src: i.src.slice(0, 22), width: i.naturalWidth, "
                         "alt: i.alt}))")
    tables = page.evaluate("[...document.querySelectorAll('table')].map(t => ({rows: t.tBodies[0].rows.length, "
                           "text: t.innerText, collapse: getComputedStyle(t).borderCollapse}))")
    text = page.locator("body").inner_text()
    page.screenshot(path=tmp_path / "report.png", full_page=True)
    page.close()

    assert requested == [html.as_uri()], f"the page loads more than itself: {requested}"
    assert len(imgs) == len(figures), f"{len(imgs)} images for the figures {figures}"
    assert all(i["src"] == "data:image/png;base64," and i["width"] > 0 and i["alt"].startswith("Table ")
               for i in imgs), imgs
    assert len(tables) == 2, tables  # Table 1 and the ablation's reference row; Tables 2, 3 and 5 have no record
    assert all(t["rows"] >= 1 and t["collapse"] == "collapse" for t in tables), tables  # JupyterLab's style
    row = next(line for line in tables[0]["text"].splitlines() if "zeroshot" in line)
    for split in ("base", "novel", "hm"):
        assert f"{100 * record['metrics'][split]:.2f}" in row, (split, row)
    assert text.count("No records.") == 3
    assert "from glad_core" not in text and "records under" not in text  # no code, no printed log
    if os.environ.get("GLAD_UPDATE_SCREENSHOT"):
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(tmp_path / "report.png", DOCS_SCREENSHOT)
    assert DOCS_SCREENSHOT.stat().st_size < 200_000, "docs/report.png: keep the README's screenshot small"
