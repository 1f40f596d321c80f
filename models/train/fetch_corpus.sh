#!/usr/bin/env bash
# Fetch the training corpus for torchwire-tiny from Debian's package archive.
#
#   bash models/train/fetch_corpus.sh [OUT_DIR]
#
# Downloads the `fortunes` and `fortunes-min` packages (the BSD fortune-mod
# cookie files; NOT `fortunes-off`) with `apt-get download`, unpacks them with
# `dpkg-deb -x` into a temporary directory, and writes
#
#   OUT_DIR/corpus.jsonl   one JSON object {"text": ...} per fortune
#   OUT_DIR/SOURCES.txt    package names, versions, licence, checksums
#   OUT_DIR/copyright/     the packages' /usr/share/doc/<pkg>/copyright files
#
# OUT_DIR defaults to models/train/data/ (git-ignored). The corpus is not
# committed: rerun this script to recreate it. Needs only apt-get, dpkg-deb,
# coreutils, sed and awk (a stock Debian 12 system). If the package lists are
# missing, the script runs `apt-get update` when root, or asks for it.
#
# Cleaning: overstrike sequences (char + backspace, used for underlining) and
# other control characters are removed, tabs and runs of spaces become one
# space, leading/trailing whitespace of every line is stripped, leading and
# trailing blank lines of every fortune are dropped, empty and duplicate
# fortunes are dropped. `ascii-art` (pictures) and `translate-me` (mostly
# non-English) are left out.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/data}"
# Pinned to the Debian 12 (bookworm) versions the bundled model was trained
# on; override with FORTUNES_VERSION= (empty) to take the candidate version.
version="${FORTUNES_VERSION-1:1.99.1-7.3}"
pkgs=(fortunes fortunes-min)
exclude_re='^(ascii-art|translate-me)$'

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
chmod 755 "$work" # lets apt's _apt user write the download

specs=()
for p in "${pkgs[@]}"; do specs+=("$p${version:+=$version}"); done

cd "$work"
if ! apt-get download "${specs[@]}" >/dev/null 2>"$work/apt.err"; then
  if [ "$(id -u)" = 0 ]; then
    echo "fetch_corpus: apt-get download failed, running apt-get update" >&2
    apt-get update -qq
    apt-get download "${specs[@]}" >/dev/null
  else
    cat "$work/apt.err" >&2
    echo "fetch_corpus: apt-get download failed; run 'sudo apt-get update' and retry" >&2
    exit 1
  fi
fi

mkdir -p "$out/copyright"
{
  echo "torchwire-tiny training corpus sources (Debian packages)"
  echo
} >"$out/SOURCES.txt"

for p in "${pkgs[@]}"; do
  deb="$(ls "$work"/"$p"_*.deb)"
  dpkg-deb -x "$deb" "$work/root"
  v="$(dpkg-deb -f "$deb" Version)"
  cp "$work/root/usr/share/doc/$p/copyright" "$out/copyright/$p"
  {
    echo "package: $p"
    echo "version: $v"
    echo "sha256:  $(sha256sum "$deb" | cut -d' ' -f1)"
    # The copyright file states: "This program falls under the BSD copyright"
    # (the Regents of the University of California, 1991; the advertising
    # clause 3 deleted, i.e. BSD-3-Clause terms).
    if grep -q 'This program falls under the BSD copyright' "$out/copyright/$p"; then
      echo "license: BSD-3-Clause (copyright file: \"This program falls under the BSD copyright\", (c) 1991 The Regents of the University of California, advertising clause deleted)"
    else
      echo "fetch_corpus: unexpected licence text in $p's copyright file" >&2
      exit 1
    fi
    echo "files:   $(dpkg-deb -c "$deb" | awk '$6 ~ /games\/fortunes\/[^.]+$/ && $1 !~ /^l/ {sub(/.*\//, "", $6); printf "%s ", $6}')"
    echo
  } >>"$out/SOURCES.txt"
done

# The cookie files: every regular file without an extension (skip *.dat
# indexes and the *.u8 symlinks), in a fixed order.
files=()
while IFS= read -r f; do
  [[ "$(basename "$f")" =~ $exclude_re ]] && continue
  files+=("$f")
done < <(find "$work/root/usr/share/games/fortunes" -type f ! -name '*.*' | LC_ALL=C sort)

for f in "${files[@]}"; do
  cat "$f"
  # make sure every file ends with a separator (some lack the final %)
  printf '\n%%\n'
done |
  LC_ALL=C sed -e ':a' -e 's/[^\x08]\x08//' -e 'ta' |
  LC_ALL=C tr -d '\000-\010\013-\037\177' |
  LC_ALL=C tr '\t' ' ' |
  LC_ALL=C sed -e 's/  */ /g' -e 's/^ //' -e 's/ $//' |
  LC_ALL=C sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' |
  LC_ALL=C awk '
    # lines arrive JSON-escaped already (backslash, double quote); joined
    # with a literal \n they form the JSON string of one fortune
    function flush(   s, i, first, last) {
      # drop leading and trailing blank lines
      first = 1; last = n
      while (first <= last && lines[first] == "") first++
      while (last >= first && lines[last] == "") last--
      s = ""
      for (i = first; i <= last; i++) s = s (i > first ? "\\n" : "") lines[i]
      n = 0
      if (s == "" || (s in seen)) return
      seen[s] = 1
      printf "{\"text\": \"%s\"}\n", s
    }
    $0 == "%" { flush(); next }
    { lines[++n] = $0 }
    END { flush() }
  ' >"$out/corpus.jsonl"

docs="$(wc -l <"$out/corpus.jsonl")"
{
  echo "excluded files: ascii-art translate-me"
  echo "documents: $docs"
  echo "corpus.jsonl sha256: $(sha256sum "$out/corpus.jsonl" | cut -d' ' -f1)"
} >>"$out/SOURCES.txt"
echo "fetch_corpus: wrote $docs fortunes to $out/corpus.jsonl" >&2
