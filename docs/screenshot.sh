#!/usr/bin/env bash
# Regenerates docs/tensorboard.png from a real run: TensorBoard served locally, captured by headless
# Chromium (Debian: apt-get install chromium). Usage: bash docs/screenshot.sh lightning_logs/small_cnn/version_0
set -euo pipefail
log_dir=${1:?the log directory of a train.py run}
port=6123
tensorboard --logdir "$log_dir" --port "$port" > /tmp/rf_callback_tensorboard.log 2>&1 &
server=$!
trap 'kill $server' EXIT
sleep 8
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --window-size=1400,1000 \
  --virtual-time-budget=20000 --hide-scrollbars --screenshot=/tmp/rf_callback_tensorboard.png \
  "http://localhost:$port/?darkMode=false#images&tagFilter=features.pool2%7Csummary"
python -c "from PIL import Image; Image.open('/tmp/rf_callback_tensorboard.png').crop((0, 0, 1400, 600)).save('docs/tensorboard.png')"
