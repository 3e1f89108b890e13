#!/usr/bin/env bash
# Print the path of a Python >= 3.12: $PYTHON if set, then python3.1x/python3 on PATH, then the oldest
# such pyenv version (oldest: the widest choice of binary wheels).
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }
for c in "${PYTHON:-}" python3.12 python3.13 python3.14 python3; do
  [ -n "$c" ] || continue
  p=$(command -v "$c" 2>/dev/null) || continue
  ok "$p" && { echo "$p"; exit 0; }
done
root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
for p in $(ls -d "$root"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -V); do
  ok "$p" && { echo "$p"; exit 0; }
done
echo "no Python >= 3.12 found (PATH, pyenv); install one or set PYTHON=/path/to/python3.12" >&2
exit 1
