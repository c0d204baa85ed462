"""Regenerates docs/mlflow.png from a real run: MLflow's UI served locally, driven and captured by headless Chromium.

    python train.py --config configs/wandb_mlflow.yaml --trainer.max_epochs 2
    python docs/mlflow_screenshot.py [lightning_logs]

Chromium (Debian: apt-get install chromium) is driven over the DevTools protocol, with a minimal
WebSocket client from the standard library, to wait for the charts, close the assistant panel and
open one layer's receptive-field card at its last step.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

PORT, DEBUG_PORT = 5123, 9323
LAYER = "02_features.pool2"


class DevTools:
    """Just enough of a WebSocket client (RFC 6455) to send DevTools commands and read their replies."""

    def __init__(self, url: str) -> None:
        host, path = url.removeprefix("ws://").split("/", 1)
        self.socket = socket.create_connection(tuple(host.split(":")) if ":" in host else (host, 80))
        key = base64.b64encode(os.urandom(16)).decode()
        self.socket.sendall(
            f"GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += self.socket.recv(1)
        assert b" 101 " in reply.split(b"\r\n")[0], reply
        self.ids = itertools.count(1)

    def _read(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            data += self.socket.recv(count - len(data))
        return data

    def _frame(self) -> bytes:
        head, size = self._read(2)
        size &= 0x7F
        if size == 126:
            (size,) = struct.unpack(">H", self._read(2))
        elif size == 127:
            (size,) = struct.unpack(">Q", self._read(8))
        payload = self._read(size)
        return payload if head & 0x80 else payload + self._frame()  # continuation frames

    def __call__(self, method: str, **params) -> dict:
        ident = next(self.ids)
        payload = json.dumps({"id": ident, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        size = len(payload)
        header = struct.pack(">BB", 0x81, 0x80 | size) if size < 126 else struct.pack(">BBH", 0x81, 0xFE, size)
        self.socket.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while True:
            message = json.loads(self._frame())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        return self("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, seconds: float = 60) -> None:
        deadline = time.time() + seconds
        while not self.evaluate(expression):
            if time.time() > deadline:
                raise TimeoutError(expression)
            time.sleep(0.5)


@contextlib.contextmanager
def browsing(server: list[str], port: int, debug_port: int, window: tuple[int, int]) -> Iterator[DevTools]:
    """The ``server`` command started and serving on ``port``, and a headless Chromium's tab on ``debug_port``.

    Each runs in a session of its own (a UI starts workers, Chromium its renderers): both are stopped after.
    """
    server_process = subprocess.Popen(
        server, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    browser = subprocess.Popen(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--hide-scrollbars", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tempfile.mkdtemp()}", f"--remote-debugging-port={debug_port}",
         f"--window-size={window[0]},{window[1]}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json", timeout=2))
                break
            except OSError:
                time.sleep(1)
        (tab,) = [t for t in targets if t["type"] == "page"]
        yield DevTools(tab["webSocketDebuggerUrl"])
    finally:
        for process in (browser, server_process):
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def main(root: Path) -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("rf-callback")
    (run,) = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    page = f"http://127.0.0.1:{PORT}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}/model-metrics"

    ui = ["mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(PORT), "--workers", "1"]
    with browsing([sys.executable, "-m", *ui], PORT, DEBUG_PORT, (1000, 1000)) as tools:
        tools("Page.navigate", url=page)
        tools.wait_for(f"document.body.innerText.includes('receptive_field/{LAYER}')")
        # close the assistant panel, open one layer's card full size, move its step slider to the end
        tools.evaluate("""[...document.querySelectorAll('button')].filter(b => /close/i.test(b.getAttribute('aria-label')
            || '')).forEach(b => b.click())""")
        tools.wait_for("[...document.images].filter(i => i.complete && i.naturalWidth > 0).length > 0")
        tools.evaluate(f"""[...document.querySelectorAll('h4')].find(h => h.textContent.trim() === 'receptive_field/{LAYER}')
            .closest('[data-testid=experiment-view-compare-runs-card]').querySelector('button').click()""")
        tools.wait_for("document.querySelector('[role=dialog] img')?.complete")
        tools.evaluate("""(() => {
            const box = document.querySelector('[role=dialog] input[type=number]');
            Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(box, box.max);
            for (const kind of ['input', 'change']) box.dispatchEvent(new Event(kind, {bubbles: true}));
            box.blur();
        })()""")
        time.sleep(4)
        step = tools.evaluate("document.querySelector('[role=dialog] input[type=number]').value")
        box = tools.evaluate(
            "(r => [r.x, r.y, r.width, r.height])(document.querySelector('[role=dialog]').getBoundingClientRect())"
        )
        shot = tools(
            "Page.captureScreenshot", format="png", clip=dict(zip(("x", "y", "width", "height"), box), scale=1)
        )
        Path("docs/mlflow.png").write_bytes(base64.b64decode(shot["data"]))
        print(f"docs/mlflow.png: receptive_field/{LAYER} at step {step} of run {run.info.run_id}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "lightning_logs"))
