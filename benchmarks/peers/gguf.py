"""llama.cpp for the peer benchmark: install llama-cpp-python from a cached wheel, convert a checkpoint to GGUF
with the converter vendored in its sdist, and quantise with `llama_cpp.llama_model_quantize()`.

The wheel is built once (5-7 minutes on two cores) with
    pip download llama-cpp-python==0.3.36 --no-binary :all: --no-deps -d ~/.cache/moepack/llama-build
    CMAKE_ARGS="-DGGML_CUDA=OFF -DGGML_NATIVE=ON -DGGML_BLAS=OFF" pip wheel --no-deps \
        -w ~/.cache/moepack/wheels ~/.cache/moepack/llama-build/llama_cpp_python-0.3.36.tar.gz
and `ensure_llama_cpp()` installs it from ~/.cache/moepack/wheels (never building inside a benchmark).

Where the CPU advertises AMX but a virtual machine faults on its tile instructions (llama.cpp's AMX kernels
for Q4_K die of SIGILL on `tilezero`; f16 runs), build only the libraries, with the ISA spelled out and AMX off,
and let `activate_built()` use them with the unpacked sdist (LIBS, symlinks kept):
    cmake -S SRC/vendor/llama.cpp -B BUILD/build-cpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON \
        -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TOOLS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
    cmake --build BUILD/build-cpu --target llama ggml-cpu -j2 && cp -a BUILD/build-cpu/bin/lib*.so* LIBS/
(a few minutes on two cores; no wheel in WHEELS then, or ensure_llama_cpp() installs the wheel instead).

Tokenizer: the converter identifies a BPE pre-tokenizer by hashing the tokens of a fixed string and refuses
hashes it does not know ("BPE pre-tokenizer was not recognized"). moepack's generated and toy checkpoints use
a byte-level BPE whose pre-tokenizer is `ByteLevel(add_prefix_space=False)` with its default GPT-2 regex, i.e.
exactly llama.cpp's "gpt-2" pre-tokenizer, so `convert()` runs the converter with that one fallback patched in
(unknown hash -> "gpt-2"). Benchmarks feed llama.cpp the same token ids as every other system anyway."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from benchmarks.peers.common import BENCH_DIR, log

VERSION = "0.3.36"
CACHE = Path.home() / ".cache" / "moepack"
WHEELS = CACHE / "wheels"
BUILD = CACHE / "llama-build"
SDIST = BUILD / f"llama_cpp_python-{VERSION}.tar.gz"
SRC = BUILD / f"llama_cpp_python-{VERSION}"
CONVERTER_DIR = SRC / "vendor" / "llama.cpp"

QUANT_TYPES = {"Q4_K_M": 15, "Q2_K": 10, "Q3_K_M": 12, "Q8_0": 7}  # llama_ftype values

_WRAPPER = r"""
import sys
sys.path[:0] = [{conv!r}, {gguf_py!r}]
import conversion.base as base
_orig = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return _orig(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"  # byte-level BPE with the GPT-2 regex: see benchmarks/peers/gguf.py
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
_orig_sp = base.TextModel._create_vocab_sentencepiece
def _create_vocab_sentencepiece(self):
    if not (self.dir_model / "tokenizer.model").is_file():  # the llama set_vocab then falls back to BPE
        raise FileNotFoundError(self.dir_model / "tokenizer.model")
    return _orig_sp(self)
base.TextModel._create_vocab_sentencepiece = _create_vocab_sentencepiece
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[1:]
import runpy
runpy.run_path({script!r}, run_name="__main__")
"""


def llama_cpp_status() -> str | None:
    """None when llama_cpp imports, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable", said plainly
        return f"{type(exc).__name__}: {exc}"
    return None


LIBS = BUILD / "lib"  # shared libraries of a build that did not get as far as a wheel (see activate_built)


def activate_built() -> bool:
    """Use llama-cpp-python straight from the unpacked sdist plus its already built shared libraries
    (libggml*, libllama in LIBS): the wheel build compiles llama.cpp's tools last, and the Python package needs
    only these libraries. Sets the environment for child processes too. True when the pieces are there."""
    if not (SRC / "llama_cpp" / "__init__.py").exists() or not (LIBS / "libllama.so").exists():
        return False
    for lib in ("libggml-base.so", "libggml-cpu.so", "libggml.so"):  # dependencies first, found by soname later
        ctypes.CDLL(str(LIBS / lib), mode=ctypes.RTLD_GLOBAL)
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    os.environ["LLAMA_CPP_LIB_PATH"] = str(LIBS)
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(LIBS), os.environ.get("LD_LIBRARY_PATH")]))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(SRC)]))
    return True


def ensure_llama_cpp() -> str | None:
    """Make llama_cpp importable: already installed, else from the cached wheel, else from the sdist plus
    built libraries (activate_built). None when usable, else the reason."""
    if llama_cpp_status() is None:
        return None
    wheels = sorted(WHEELS.glob(f"llama_cpp_python-{VERSION}-*.whl"))
    if not wheels:
        if activate_built():
            return llama_cpp_status()
        return (f"llama-cpp-python is not installed and no wheel is cached in {WHEELS} (build it once: see "
                f"benchmarks/peers/gguf.py)")
    log(f"installing {wheels[-1].name}")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", str(wheels[-1])],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return f"pip install {wheels[-1].name} failed: {proc.stderr.strip()[-300:]}"
    for dep in ("diskcache", "jinja2"):  # runtime dependencies of llama_cpp (import-time)
        try:
            __import__(dep)
        except ImportError:
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", dep], capture_output=True)
    import importlib

    importlib.invalidate_caches()
    return llama_cpp_status()


def converter() -> Path | None:
    script = CONVERTER_DIR / "convert_hf_to_gguf.py"
    if not script.exists() and SDIST.exists():
        with tarfile.open(SDIST) as tf:
            tf.extractall(BUILD, filter="data")
    return script if script.exists() else None


def convert(src: Path, outtype: str = "f16") -> Path:
    """HF checkpoint -> GGUF (cached). Raises RuntimeError with the converter's last lines on failure."""
    out = BENCH_DIR / f"{Path(src).name}.{outtype}.gguf"
    if out.exists():
        return out
    script = converter()
    if script is None:
        raise RuntimeError(f"the llama.cpp converter is missing (no {SDIST}); see benchmarks/peers/gguf.py")
    wrapper = BENCH_DIR / "convert_wrapper.py"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(_WRAPPER.format(conv=str(CONVERTER_DIR), gguf_py=str(CONVERTER_DIR / "gguf-py"),
                                       script=str(script)))
    log(f"converting {src} to GGUF {outtype}")
    tmp = out.with_name(out.name + ".partial")
    proc = subprocess.run([sys.executable, str(wrapper), str(src), "--outfile", str(tmp), "--outtype", outtype],
                          capture_output=True, text=True, env=dict(os.environ, NO_LOCAL_GGUF=""))
    if proc.returncode != 0 or not tmp.exists():
        raise RuntimeError("convert_hf_to_gguf.py failed: " + "\n".join(proc.stderr.strip().splitlines()[-6:]))
    tmp.rename(out)
    return out


def quantize(f16: Path, qtype: str, threads: int = 2) -> Path:
    """GGUF f16 -> `qtype` (Q4_K_M, Q2_K, ...) through llama_cpp.llama_model_quantize (cached)."""
    import llama_cpp

    out = Path(str(f16).replace(".f16.gguf", f".{qtype}.gguf"))
    if out.exists():
        return out
    log(f"quantising {f16.name} to {qtype}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype]
    params.nthread = threads
    tmp = out.with_name(out.name + ".partial")
    rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.exists():
        raise RuntimeError(f"llama_model_quantize({qtype}) returned {rc}")
    tmp.rename(out)
    return out
