"""llama.cpp's llama-server and GGUF converter, from the llama-cpp-python sdist on PyPI.

Used by scripts/bench_llamacpp.py. Everything lives under
$TORCHWIRE_CACHE/llamacpp/ (default ~/.cache/torchwire/llamacpp), never in the
repository:

    sdist/llama_cpp_python-<version>.tar.gz     downloaded once (sha256 checked)
    src-<version>/                              unpacked once
    build-<version>-<flags>/bin/llama-server    built once with cmake

    python scripts/llamacpp.py                  fetch + build, print llama-server's path
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from urllib.parse import urljoin

DEFAULT_VERSION = "0.3.36"
PYPI = "https://pypi.org/pypi/llama-cpp-python"
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON",
               "-DLLAMA_BUILD_TESTS=OFF"]


def log(msg):
    print(f"[llamacpp] {msg}", file=sys.stderr, flush=True)


def cache_dir():
    base = os.environ.get("TORCHWIRE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torchwire")
    return os.path.join(base, "llamacpp")


def _get_json(url):
    with urllib.request.urlopen(url, timeout=120) as r:
        return json.load(r), r.geturl()


def sdist_info(version):
    """(url, sha256, version) of the sdist of `version`, or of the newest release that has one.

    Reads PyPI's JSON API with urllib: the per-version document, falling back to the
    project document (some mirrors serve only that one)."""
    if version:
        try:
            doc, base = _get_json(f"{PYPI}/{version}/json")
            files = doc.get("urls") or []
        except urllib.error.HTTPError:
            doc, base = _get_json(f"{PYPI}/json")
            files = doc["releases"].get(version) or []
        for f in files:
            if f["packagetype"] == "sdist" and f["filename"].endswith(".tar.gz"):
                return urljoin(base, f["url"]), f["digests"]["sha256"], version
        log(f"llama-cpp-python {version} has no sdist; taking the newest that has one")
    doc, base = _get_json(f"{PYPI}/json")

    def key(v):
        return tuple(int(x) if x.isdigit() else -1 for x in v.split("."))

    for v in sorted(doc["releases"], key=key, reverse=True):
        for f in doc["releases"][v]:
            if f["packagetype"] == "sdist" and f["filename"].endswith(".tar.gz") and not f.get("yanked"):
                return urljoin(base, f["url"]), f["digests"]["sha256"], v
    raise SystemExit("no llama-cpp-python sdist found on PyPI")


def fetch_source(version=DEFAULT_VERSION):
    """The unpacked sdist (downloaded and unpacked once); returns (source dir, version)."""
    root = cache_dir()
    os.makedirs(os.path.join(root, "sdist"), exist_ok=True)
    # A finished unpack of the requested version needs no network.
    src = os.path.join(root, f"src-{version}")
    if version and os.path.exists(os.path.join(src, ".complete")):
        return src, version
    url, sha, version = sdist_info(version)
    src = os.path.join(root, f"src-{version}")
    if os.path.exists(os.path.join(src, ".complete")):
        return src, version
    archive = os.path.join(root, "sdist", f"llama_cpp_python-{version}.tar.gz")
    if not os.path.exists(archive):
        log(f"downloading llama-cpp-python {version} sdist ({url})")
        part = archive + ".part"
        h = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=600) as r, open(part, "wb") as out:
            while chunk := r.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != sha:
            os.remove(part)
            raise SystemExit(f"sha256 mismatch for {url}: {h.hexdigest()} != {sha}")
        os.replace(part, archive)
    log(f"unpacking {archive}")
    tmp = src + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    (top,) = os.listdir(tmp)
    shutil.rmtree(src, ignore_errors=True)
    os.replace(os.path.join(tmp, top), src)
    os.rmdir(tmp)
    open(os.path.join(src, ".complete"), "w").close()
    return src, version


def llama_dir(src):
    return os.path.join(src, "vendor", "llama.cpp")


def build_server(version=DEFAULT_VERSION, jobs=2):
    """Path of llama-server, built with cmake once per version."""
    src, version = fetch_source(version)
    build = os.path.join(cache_dir(), f"build-{version}-native")
    binary = os.path.join(build, "bin", "llama-server")
    if os.path.exists(os.path.join(build, ".complete")) and os.access(binary, os.X_OK):
        return binary
    cmake = shutil.which("cmake")
    if not cmake:
        log("no cmake: installing it into the venv (pip install cmake)")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "cmake"], check=True)
        cmake = shutil.which("cmake") or os.path.join(os.path.dirname(sys.executable), "cmake")
    log(f"building llama-server in {build} (about 12 minutes on 2 cores)")
    subprocess.run([cmake, "-S", llama_dir(src), "-B", build, *CMAKE_FLAGS], check=True, stdout=sys.stderr)
    subprocess.run([cmake, "--build", build, "--config", "Release", "--target", "llama-server", f"-j{jobs}"],
                   check=True, stdout=sys.stderr)
    open(os.path.join(build, ".complete"), "w").close()
    return binary


def ensure_converter_deps(src):
    """PYTHONPATH entry for the vendored gguf-py; installs what the converter imports and the venv lacks."""
    gguf_py = os.path.join(llama_dir(src), "gguf-py")
    missing = []
    for module, package in (("numpy", "numpy"), ("sentencepiece", "sentencepiece"), ("yaml", "pyyaml"),
                            ("safetensors", "safetensors"), ("transformers", "transformers")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        log(f"installing the converter's dependencies into the venv: {' '.join(missing)}")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True)
    return gguf_py


# Runs convert_hf_to_gguf.py with one change: a byte-level BPE tokenizer whose
# pre-tokenizer hash the converter does not know (the bundled model's, and those of
# make_random_checkpoint.py: GPT-2's ByteLevel split) is written as "gpt-2" instead of
# refused. The benchmark sends token ids, so this only names the split in the GGUF.
_CONVERT = """
import os, runpy, sys
script = sys.argv[1]
sys.path[:0] = [os.path.dirname(script)]
import conversion.base as base
known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        print("convert: unknown BPE pre-tokenizer, written as gpt-2", file=sys.stderr)
        return "gpt-2"
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def convert(src, model_dir, out_path, outtype="f32"):
    """GGUF of a HF checkpoint (cached next to the build, keyed by the caller's out_path)."""
    if os.path.exists(out_path):
        return out_path
    gguf_py = ensure_converter_deps(src)
    env = dict(os.environ)
    env["PYTHONPATH"] = gguf_py + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    tmp = out_path + ".part"
    log(f"converting {model_dir} to GGUF {outtype}")
    script = os.path.join(llama_dir(src), "convert_hf_to_gguf.py")
    subprocess.run([sys.executable, "-c", _CONVERT, script, model_dir, "--outfile", tmp, "--outtype", outtype],
                   check=True, env=env, stdout=sys.stderr)
    os.replace(tmp, out_path)
    return out_path


if __name__ == "__main__":
    print(build_server(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_VERSION))
