"""Regenerates the TensorBoard screenshots in docs/ from a real run, and measures how TensorBoard shows the cards.

    python train.py
    python docs/tensorboard_screenshot.py [lightning_logs] [--window 1280x800] [--out docs]

TensorBoard (its default, fast loader) is served locally and headless Chromium (Debian: apt-get install
chromium) is driven over the DevTools protocol, at a default window size. It writes:

* ``docs/tensorboard.png``: the Images tab, filtered to ``features.pool2``: its probes and its mean map;
* ``docs/tensorboard_timeseries.png``: the Time Series tab (TensorBoard's first), filtered the same way;
* ``docs/tensorboard_scalars.png``: the Scalars tab, with the description of ``erf_size`` opened by its
  (i) button;
* ``docs/tensorboard_text.png``: the Text tab, the receptive-field tables;

and prints, for every receptive-field image on the Images and Time Series tabs, its size and the size it is
shown at: a picture laid out for the card (``rf_callback.render.CARD``) is shown at 1 to 1.07 of its size.
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from mlflow_screenshot import DevTools, browsing  # the sibling script's minimal DevTools client and browser

PORT, DEBUG_PORT = 6123, 9324
LAYER = "02_features.pool2"

DEEP = """
    function deepAll(selector, root = document) {  // querySelectorAll through the shadow roots of Polymer's tabs
        const found = [...root.querySelectorAll(selector)];
        for (const element of root.querySelectorAll('*')) {
            if (element.shadowRoot) found.push(...deepAll(selector, element.shadowRoot));
        }
        return found;
    }
"""

SHOWN = """deepAll('img').filter(i => i.complete && i.naturalWidth > 0 && /individualImage|imageData/.test(i.src)
                                && i.getBoundingClientRect().width > 0)"""
"""The images of logged summaries that the tab on show displays (Images: individualImage, Time Series: imageData)."""

SIZES = (
    DEEP
    + SHOWN
    + """.map(i => {
    const box = i.getBoundingClientRect();
    const scale = Math.min(box.width / i.naturalWidth, box.height / i.naturalHeight);  // object-fit: contain
    const key = new URL(i.src).searchParams.get('blob_key');  // Images: [experiment, run, tag, ...] in base64
    const tag = key ? JSON.parse(atob(key.replace(/-/g, '+').replace(/_/g, '/') + '='.repeat((4 - key.length % 4) % 4)))[2]
                    : i.closest('image-card').querySelector('.tag-path').getAttribute('title');  // Time Series
    return [tag, i.naturalWidth, i.naturalHeight, Math.round(scale * 1000) / 1000];
})"""
)


def shoot(tools: DevTools, path: Path, size: tuple[int, int]) -> None:
    clip = {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1}
    path.write_bytes(base64.b64decode(tools("Page.captureScreenshot", format="png", clip=clip)["data"]))
    print(path)


def show(tools: DevTools, fragment: str, ready: str) -> None:
    tools("Page.navigate", url=f"http://127.0.0.1:{PORT}/?darkMode=false#{fragment}")
    tools.wait_for(DEEP + ready, 90)
    time.sleep(3)  # the last images and charts settle


def measure(tools: DevTools, tab: str) -> None:
    for tag, width, height, scale in sorted({tuple(row) for row in tools.evaluate(SIZES)}):
        print(f"  {tab}: {tag}: {width}x{height} px, shown at {scale}x")


def main(logs: Path, window: tuple[int, int], out: Path) -> None:
    board = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        str(logs),
        "--port",
        str(PORT),
        "--host",
        "127.0.0.1",
    ]
    with browsing(board, PORT, DEBUG_PORT, window) as tools:
        tools(
            "Emulation.setDeviceMetricsOverride", width=window[0], height=window[1], deviceScaleFactor=1, mobile=False
        )

        show(tools, "images&tagFilter=pool2", SHOWN + ".length >= 2")
        print(f"Images tab at {window[0]}x{window[1]}:")
        measure(tools, "Images")
        shoot(tools, out / "tensorboard.png", window)

        show(tools, "timeseries", "document.querySelector('input[placeholder*=\"Filter tags\"]') !== null")
        print(f"Time Series tab at {window[0]}x{window[1]}:")
        for pattern in ("summary$|relu2$|relu2/mean$", "pool2$|pool2/mean$"):  # images only: they load when shown
            tools.evaluate(f"""(() => {{
                const box = document.querySelector('input[placeholder*="Filter tags"]');
                box.value = '{pattern}';
                box.dispatchEvent(new Event('input', {{bubbles: true}}));
            }})()""")
            time.sleep(2)
            tools.wait_for(DEEP + SHOWN + ".length >= 2", 90)
            time.sleep(3)
            measure(tools, "Time Series")
        shoot(tools, out / "tensorboard_timeseries.png", window)

        try:
            show(tools, "scalars&tagFilter=pool2/erf_size", "deepAll('paper-icon-button[icon=info]').length > 0")
        except TimeoutError:
            print("Scalars tab: no (i) button: TensorBoard has no description of these scalars")
        else:
            # the right-hand chart's: its dialog opens over the left-hand one (a left-hand chart's is clipped)
            card = f"deepAll('tf-scalar-card').find(c => c.tag === 'receptive_field/{LAYER}/erf_size_fraction')"
            tools.evaluate(DEEP + f"deepAll('paper-icon-button[icon=info]', {card}.shadowRoot)[0].click()")
            tools.wait_for(DEEP + "deepAll('#descriptionDialog').some(d => d.opened)", 30)
            time.sleep(1)
            description = tools.evaluate(
                DEEP + "deepAll('#markdown', deepAll('#descriptionDialog').find(d => d.opened))[0].textContent"
            )
            print(f"Scalars tab: the (i) of {LAYER}/erf_size_fraction opens: {' '.join(description.split())!r}")
        shoot(tools, out / "tensorboard_scalars.png", window)

        show(tools, "text&tagFilter=table", "deepAll('tf-text-loader').length > 0")
        shoot(tools, out / "tensorboard_text.png", window)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="?", default="lightning_logs", type=Path, help="the folder of train.py runs")
    parser.add_argument("--window", default="1280x800", help="the browser window, WIDTHxHEIGHT (default 1280x800)")
    parser.add_argument("--out", default="docs", type=Path, help="the folder for the screenshots (default docs)")
    args = parser.parse_args()
    main(args.logs, tuple(int(n) for n in args.window.split("x")), args.out)
