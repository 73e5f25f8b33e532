import os
import subprocess
import sys
from pathlib import Path

import pytest

from medusa_gguf.settings import DEFAULT_MEDUSA_WEIGHTS_PATH, Settings, SettingsError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_from_empty_environment():
    s = Settings.from_env({})
    assert s.base_model_path is None
    assert s.medusa_weights_path == Path(DEFAULT_MEDUSA_WEIGHTS_PATH)
    assert s.n_gpu_layers == -1
    assert s.n_threads is None
    assert (s.use_mlock, s.use_mmap) == (False, True)
    assert (s.host, s.port) == ("127.0.0.1", 8000)


def test_environment_values_are_parsed():
    s = Settings.from_env(
        {"N_THREADS": "8", "USE_MMAP": "no", "USE_MLOCK": "TRUE", "N_CTX": "2048", "BASE_MODEL_PATH": "m.gguf",
         "MAX_TOKENS_PER_STEP": "4", "PORT": "9000", "N_GPU_LAYERS": "0"}
    )
    assert (s.n_threads, s.use_mmap, s.use_mlock, s.n_ctx) == (8, False, True, 2048)
    assert (s.base_model_path, s.max_tokens_per_step, s.port, s.n_gpu_layers) == (Path("m.gguf"), 4, 9000, 0)


def test_overrides_win_and_none_keeps_environment():
    s = Settings.from_env({"N_THREADS": "8", "N_CTX": "2048"}, n_threads=3, n_ctx=None)
    assert (s.n_threads, s.n_ctx) == (3, 2048)


@pytest.mark.parametrize(
    "var, value, expected",
    [
        ("N_THREADS", "abc", "N_THREADS='abc' is not an integer; accepted values: integers from 1 to 1024"),
        ("USE_MMAP", "maybe", "USE_MMAP='maybe' is not a boolean; accepted values: 1, true"),
        ("N_GPU_LAYERS", "-2", "N_GPU_LAYERS=-2 is out of range; accepted values: integers >= -1"),
        ("PORT", "70000", "PORT=70000 is out of range"),
        ("N_CTX", "", "N_CTX='' is not an integer"),
        ("HOST", "  ", "HOST is set but empty"),
    ],
)
def test_invalid_environment_names_variable_and_accepted_values(var, value, expected):
    with pytest.raises(SettingsError) as err:
        Settings.from_env({var: value})
    assert expected in str(err.value)


def test_values_from_code_pass_the_same_checks():
    with pytest.raises(SettingsError, match="N_THREADS=0 is out of range"):
        Settings(n_threads=0)


def test_config_py_exposes_founding_names():
    env = {**os.environ, "MEDUSA_WEIGHTS_PATH": "/tmp/x/heads.pth", "N_THREADS": "3"}
    code = "import config; print(config.MEDUSA_WEIGHTS_PATH, config.N_THREADS, config.N_GPU_LAYERS, config.USE_MMAP)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["/tmp/x/heads.pth", "3", "-1", "True"]


def test_config_py_default_weights_path():
    env = {k: v for k, v in os.environ.items() if k != "MEDUSA_WEIGHTS_PATH"}
    code = "import config; print(config.MEDUSA_WEIGHTS_PATH)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "medusa_heads_weights/medusa_heads_latest.pth"
