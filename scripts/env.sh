#!/usr/bin/env bash
# Run a command inside coalora-edge's Python environment, creating it first if needed.
#
#   scripts/env.sh coalora-edge demo
#   scripts/env.sh python -m pytest
#
# The virtual environment lives OUTSIDE the checkout, in
# ${COALORA_CACHE:-~/.cache/coalora-edge}/venv-<key>, where <key> hashes the dependency
# spec (pyproject.toml's dependency lists, the pins below, this script, the Python
# version). Later runs, other clones and CI with the same spec reuse it; changing a
# dependency makes a new one. llama-cpp-python is a 10-25 minute source build, so its
# wheel is cached on its own in ${COALORA_CACHE}/wheels and survives spec changes.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${COALORA_CACHE:-$HOME/.cache/coalora-edge}"
python="${PYTHON:-python3}"

# torch goes in first and pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC="torch==2.13.0"
LLAMA_SPEC="llama-cpp-python==0.3.36"
# Portable ggml: -march=native turns on AMX kernels that die with SIGILL on VMs that
# advertise AMX without supporting it.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"

key="$(
  {
    "$python" - "$here/pyproject.toml" <<'PY'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(sorted(p["dependencies"]), sorted((k, sorted(v)) for k, v in p.get("optional-dependencies", {}).items()))
PY
    echo "$TORCH_SPEC $LLAMA_SPEC $CMAKE_ARGS"
    "$python" -c 'import sys; print(sys.version)'
    cat "${BASH_SOURCE[0]}"
  } | sha256sum | cut -c1-16
)"
venv="$cache/venv-$key"
mkdir -p "$cache/wheels"

# One builder at a time; a venv without its .complete marker was interrupted: redo it.
exec 9>"$cache/.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  echo "coalora-edge: creating the environment $venv (first run only)" >&2
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip setuptools wheel
  "$venv/bin/pip" install --quiet "$TORCH_SPEC"
  if ! ls "$cache/wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "coalora-edge: building $LLAMA_SPEC from source with $CMAKE_ARGS (10-25 minutes, once)" >&2
    "$venv/bin/pip" wheel --quiet --no-deps "$LLAMA_SPEC" -w "$cache/wheels"
  fi
  "$venv/bin/pip" install --quiet --find-links "$cache/wheels" "$TORCH_SPEC" "$LLAMA_SPEC" -e "$here[test]"
  echo "$here $(sha256sum "$here/pyproject.toml" | cut -c1-16)" >"$venv/.project"
  touch "$venv/.complete"
fi
# The environment is shared by clones: point its editable install at this checkout, and
# redo it when the package layout changes (the editable finder maps package folders).
project="$here $(sha256sum "$here/pyproject.toml" | cut -c1-16)"
if [ "$(cat "$venv/.project")" != "$project" ]; then
  "$venv/bin/pip" install --quiet --no-deps --no-build-isolation -e "$here"
  echo "$project" >"$venv/.project"
fi
flock -u 9

export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
cd "$here"
exec "$@"
