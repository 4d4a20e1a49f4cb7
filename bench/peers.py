"""The peers `bench/serving.py` measures easllm against, started as the user of each would start them.

llama-server   llama.cpp's own C++ server (the engine under Ollama), built once from the
               llama.cpp vendored in the llama-cpp-python sdist we pin, into a cache folder
               outside the repository (about 12 minutes on 2 cores), with the same compiler
               flags as our llama-cpp-python wheel.
llama-cpp-python server   `python -m llama_cpp.server` (the [server] extra), started with
               `--interrupt_requests False` so concurrent requests queue rather than cancel.

  .venv/bin/python bench/peers.py          # build llama-server now (the benchmark does it too)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"  # the Makefile's LLAMA_VERSION
CACHE = Path(os.environ.get("EASLLM_BENCH_CACHE", Path.home() / ".cache" / "easllm" / "peers"))
# Linux refuses AMX tiles to processes here while the CPU advertises them (SIGILL): as in the Makefile
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


class PeerUnavailable(RuntimeError):
    """A peer cannot be built or started here; the benchmark skips it and says why."""


def llama_server_binary() -> Path:
    """The cached `llama-server`, built first if missing; PeerUnavailable when it cannot be."""
    binary = CACHE / f"llama-server-{LLAMA_CPP_PYTHON}"
    if binary.exists():
        return binary
    if shutil.which("cmake") is None:
        raise PeerUnavailable("cmake is not installed (Debian package cmake)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        source = _vendored_llama_cpp(Path(tmp))
        env = {**os.environ, "CFLAGS": NO_AMX, "CXXFLAGS": NO_AMX}
        configure = [
            "cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
            "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=ON", "-DBUILD_SHARED_LIBS=OFF",
        ]  # fmt: skip
        build = ["cmake", "--build", "build", "--target", "llama-server", "-j2"]
        print(f">> building llama-server from llama-cpp-python {LLAMA_CPP_PYTHON}'s llama.cpp "
              "(about 12 minutes on 2 cores, once)", file=sys.stderr)  # fmt: skip
        for command in (configure, build):
            done = subprocess.run(command, cwd=source, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise PeerUnavailable(f"{' '.join(command[:3])} failed: {done.stderr[-2000:]}")
        built = source / "build" / "bin" / "llama-server"
        shutil.copy2(built, binary.with_suffix(".tmp"))
        binary.with_suffix(".tmp").rename(binary)
    return binary


def _vendored_llama_cpp(into: Path) -> Path:
    download = [
        sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
        "-d", str(into), f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
    ]  # fmt: skip
    done = subprocess.run(download, capture_output=True, text=True)
    if done.returncode != 0:
        raise PeerUnavailable(f"pip download of the llama-cpp-python sdist failed: {done.stderr[-1000:]}")
    (sdist,) = into.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(into, filter="data")
    (source,) = into.glob("llama_cpp_python-*/vendor/llama.cpp")
    return source


def llama_cpp_python_server_available() -> str | None:
    """None when `python -m llama_cpp.server` can start, else why not."""
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError as exc:
        return f"{exc} (install its [server] extra: make bench-deps)"
    return None


if __name__ == "__main__":
    print(llama_server_binary())
