#!/usr/bin/env bash
# Fetches real Hugging Face chat templates for the template parity test:
# llama.cpp's models/templates/*.jinja, as shipped inside the llama-cpp-python
# source distribution on PyPI. Only the templates are extracted, into
# $TORCHWIRE_CACHE/chat-templates/<version>/, and reused on later runs.
# Prints that directory on stdout.
#
#   TORCHWIRE_CACHE   cache directory (default: ~/.cache/torchwire)
set -euo pipefail

version="0.3.36"
cache="${TORCHWIRE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/torchwire}"
dest="$cache/chat-templates/llama-cpp-python-$version"
python="${PYTHON:-python3}"

if [ ! -f "$dest/.complete" ]; then
  echo "fetching chat templates from llama-cpp-python==$version (PyPI sdist, once)" >&2
  work="$(mktemp -d "$cache/chat-templates-XXXXXX" 2>/dev/null || { mkdir -p "$cache" && mktemp -d "$cache/chat-templates-XXXXXX"; })"
  trap 'rm -rf "$work"' EXIT
  # --no-binary for this package only: its build dependencies may be wheels.
  "$python" -m pip download --quiet --disable-pip-version-check --no-deps \
    --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$work" >&2
  "$python" - "$work"/llama_cpp_python-"$version".tar.gz "$work/templates" <<'PY'
import pathlib, sys, tarfile

archive, out = sys.argv[1], pathlib.Path(sys.argv[2])
out.mkdir(parents=True)
marker = "/vendor/llama.cpp/models/templates/"
count = 0
with tarfile.open(archive) as tar:
    for member in tar:
        name = member.name
        if member.isfile() and marker in name and name.endswith(".jinja"):
            data = tar.extractfile(member).read()
            (out / pathlib.PurePosixPath(name).name).write_bytes(data)
            count += 1
if count == 0:
    sys.exit(f"no templates found in {archive}")
print(f"extracted {count} templates", file=sys.stderr)
PY
  rm -rf "$dest"
  mkdir -p "$(dirname "$dest")"
  mv "$work/templates" "$dest"
  touch "$dest/.complete"
fi
echo "$dest"
