#!/usr/bin/env bash
# Regenerates the TensorBoard screenshots in docs/ from a real run: TensorBoard served locally,
# captured by headless Chromium (Debian: apt-get install chromium), one picture per tab.
#   python train.py && bash docs/screenshot.sh lightning_logs
# docs/tensorboard.png (Images: the last layer's maps), docs/tensorboard_scalars.png (Scalars, with
# the descriptions), docs/tensorboard_text.png (Text: the receptive-field tables).
set -euo pipefail
logs=${1:?the folder of train.py runs, e.g. lightning_logs}
port=6123
tensorboard --logdir "$logs" --port "$port" > /tmp/rf_callback_tensorboard.log 2>&1 &
server=$!
trap 'kill $server' EXIT
sleep 10
shoot() {  # shoot <url fragment> <output> <height to keep>
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --window-size=1400,1100 \
    --virtual-time-budget=25000 --hide-scrollbars --screenshot=/tmp/rf_callback_shot.png \
    "http://localhost:$port/?darkMode=false#$1" 2>/dev/null
  python -c "from PIL import Image; Image.open('/tmp/rf_callback_shot.png').crop((0, 0, 1400, $3)).save('$2')"
}
shoot "images&tagFilter=pool2" docs/tensorboard.png 760
shoot "scalars&tagFilter=pool2" docs/tensorboard_scalars.png 760
shoot "text&tagFilter=table" docs/tensorboard_text.png 900
