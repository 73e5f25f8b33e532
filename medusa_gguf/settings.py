"""One typed settings object, read once from the environment and overridden from the command line.

Every entry point (`medusa-gguf ...`, `python main.py`, `config.py`) builds its `Settings` here, so a default is
written in exactly one place. A bad value raises `SettingsError` naming the variable and what it accepts.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

DEFAULT_MEDUSA_WEIGHTS_PATH = "medusa_heads_weights/medusa_heads_latest.pth"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class SettingsError(ValueError):
    """A setting has a value the project cannot use; the message names the variable and the accepted values."""


def _parse_bool(name: str, raw: str) -> bool:
    low = raw.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean; accepted values: {', '.join(_TRUE + _FALSE)}")


def _int_parser(lo: int | None = None, hi: int | None = None) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not an integer; {_int_range(lo, hi)}") from None
        _check_range(name, value, lo, hi)
        return value

    return parse


def _int_range(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"accepted values: integers from {lo} to {hi}"
    if lo is not None:
        return f"accepted values: integers >= {lo}"
    return "accepted values: integers"


def _check_range(name: str, value: int, lo: int | None, hi: int | None) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise SettingsError(f"{name}={value} is out of range; {_int_range(lo, hi)}")


def _parse_str(name: str, raw: str) -> str:
    if not raw.strip():
        raise SettingsError(f"{name} is set but empty; unset it or give a value")
    return raw.strip()


KV_TYPES = ("auto", "f16", "bf16", "q8_0", "f32")


def _parse_kv_type(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in KV_TYPES:
        raise SettingsError(f"{name}={raw!r} is not a KV cache type; accepted values: {', '.join(KV_TYPES)}")
    return value


DRAFTERS = ("auto", "heads", "eagle3")


def _parse_drafter(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in DRAFTERS:
        raise SettingsError(f"{name}={raw!r} is not a drafter kind; accepted values: {', '.join(DRAFTERS)}")
    return value


def _parse_auto_bool(name: str, raw: str) -> bool | None:
    """A boolean, or `auto` (None): the program decides and logs why."""
    if raw.strip().lower() == "auto":
        return None
    try:
        return _parse_bool(name, raw)
    except SettingsError:
        raise SettingsError(f"{name}={raw!r} is neither auto nor a boolean; accepted values: auto, "
                            f"{', '.join(_TRUE + _FALSE)}") from None


def _parse_optional_path(name: str, raw: str) -> Path | None:
    return Path(_parse_str(name, raw)).expanduser()


# Each field keeps its environment variable and parser in its metadata, beside its default.
def _env(var: str, parse: Callable[[str, str], Any], **kw: Any) -> Any:
    return field(metadata={"env": var, "parse": parse}, **kw)


@dataclass(frozen=True)
class Settings:
    """Runtime configuration. `None` for `base_model_path` means the embedded default model."""

    base_model_path: Path | None = _env("BASE_MODEL_PATH", _parse_optional_path, default=None)
    medusa_weights_path: Path = _env(
        "MEDUSA_WEIGHTS_PATH", _parse_optional_path, default=Path(DEFAULT_MEDUSA_WEIGHTS_PATH)
    )
    n_gpu_layers: int = _env("N_GPU_LAYERS", _int_parser(lo=-1), default=-1)  # -1: offload every layer
    n_threads: int | None = _env("N_THREADS", _int_parser(lo=1, hi=1024), default=None)  # None: llama.cpp picks
    use_mlock: bool = _env("USE_MLOCK", _parse_bool, default=False)
    use_mmap: bool = _env("USE_MMAP", _parse_bool, default=True)
    # llama.cpp's extra CPU buffer types: weight repacking (Q4_0 8x8 on AVX2: cheaper batched calls) and AMX.
    # None (auto): on, unless the repacked weights make a batched call differ from single-token decoding (Q4_K
    # here), measured at load (Backend). scripts/setup.sh builds llama.cpp without AMX where AMX tiles fault.
    use_extra_bufts: bool | None = _env("USE_EXTRA_BUFTS", _parse_auto_bool, default=None)
    n_ctx: int = _env("N_CTX", _int_parser(lo=16, hi=1 << 20), default=4096)
    # The KV cache's element type. auto: bf16 where the CPU computes attention (its f16 single-token path differs
    # from trees from 512 cells on, see backend.resolve_kv_type), else f16.
    kv_type: str = _env("KV_TYPE", _parse_kv_type, default="auto")
    max_tokens_per_step: int = _env("MAX_TOKENS_PER_STEP", _int_parser(lo=1, hi=64), default=6)
    # auto: calibrate from the heads' accuracies and this machine's cost curve; chain; plain; or a JSON file.
    tree: str = _env("TREE", _parse_str, default="auto")
    # Which shipped drafter serves when MEDUSA_WEIGHTS_PATH holds none: auto (TREE=auto: the one predicted faster;
    # a static tree: the heads), heads, or eagle3. MEDUSA_WEIGHTS_PATH may itself be an exported EAGLE-3 .gguf.
    drafter: str = _env("DRAFTER", _parse_drafter, default="auto")
    host: str = _env("HOST", _parse_str, default="127.0.0.1")
    port: int = _env("PORT", _int_parser(lo=0, hi=65535), default=8000)
    # server: requests served at once, as slots of one llama.cpp context whose decode calls they share
    n_parallel: int = _env("N_PARALLEL", _int_parser(lo=1, hi=64), default=4)
    max_queue: int = _env("MAX_QUEUE", _int_parser(lo=0, hi=100_000), default=16)  # server: requests waiting; then 503
    api_key: str | None = _env("API_KEY", _parse_str, default=None, repr=False)  # server: None = no key needed
    # server: seconds between keep-alive comments on a quiet stream (queued, reading the prompt); 0: none
    sse_keepalive_s: int = _env("SSE_KEEPALIVE_S", _int_parser(lo=0, hi=3600), default=10)

    def __post_init__(self) -> None:
        # Values given in code or on the command line pass the same range checks as the environment.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool):
                f.metadata["parse"](f.metadata["env"], str(value))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Read every known variable from `environ` (default: os.environ); non-None overrides win."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is not None:
                values[f.name] = f.metadata["parse"](f.metadata["env"], raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @staticmethod
    def env_names() -> dict[str, str]:
        """Field name -> environment variable, for help texts."""
        return {f.name: f.metadata["env"] for f in dataclasses.fields(Settings)}
