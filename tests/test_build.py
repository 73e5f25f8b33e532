"""llama.cpp's build flags (scripts/llama_build.py, the AMX probe) and the buffer types a loaded model reports."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medusa_gguf.backend import Backend, quantize, weight_buffers
from medusa_gguf.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("llama_build", ROOT / "scripts" / "llama_build.py")
llama_build = importlib.util.module_from_spec(_spec)
sys.modules["llama_build"] = llama_build  # dataclasses look their module up while the class is built
_spec.loader.exec_module(llama_build)

# The Xeon where AMX faults reports these, amx_tile among them (and no avx512_vp2intersect: absent flags turn OFF).
XEON_FLAGS = set(
    "fpu sse sse2 sse4_2 avx avx2 fma f16c bmi2 avx512f avx512vbmi avx512_vnni avx512_bf16 avx_vnni "
    "amx_bf16 amx_tile amx_int8".split()
)
FAULT = llama_build.Probe("fault", "killed by signal 11 running tile instructions")


def must_not_probe() -> llama_build.Probe:
    raise AssertionError("the probe ran although the CPU reports no AMX")


def test_cpu_flags_reads_the_flags_line():
    text = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 amx_tile\nbugs\t\t: spectre_v1\n"
    assert llama_build.cpu_flags(text) == {"fpu", "avx2", "amx_tile"}
    assert llama_build.cpu_flags("processor : 0\n") == set()


def test_faulting_amx_builds_without_native_and_keeps_the_other_instruction_sets():
    d = llama_build.decide("cpu", XEON_FLAGS, lambda: FAULT)
    args = d.cmake_args.split()
    assert args[0] == "-DGGML_NATIVE=OFF"
    for opt in ["AVX", "AVX2", "FMA", "F16C", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16",
                "AVX_VNNI", "SSE42"]:
        assert f"-DGGML_{opt}=ON" in args, opt
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(args)
    assert "probe failed (fault: killed by signal 11" in d.reason


def test_instruction_sets_the_cpu_lacks_are_turned_off():
    # ggml turns AVX/AVX2/FMA/F16C/BMI2 on by default once GGML_NATIVE is off; a CPU without them must say OFF.
    args = llama_build.decide("cpu", {"amx_tile", "avx", "avx512vnni"}, lambda: FAULT).cmake_args.split()
    assert "-DGGML_AVX=ON" in args and "-DGGML_AVX512_VNNI=ON" in args  # the old VNNI spelling counts too
    assert "-DGGML_AVX2=OFF" in args and "-DGGML_FMA=OFF" in args and "-DGGML_AVX512=OFF" in args


@pytest.mark.parametrize("status", ["refused", "no-amx", "wrong", "unavailable"])
def test_any_probe_short_of_working_tiles_avoids_amx(status):
    d = llama_build.decide("cpu", XEON_FLAGS, lambda: llama_build.Probe(status, "x"))
    assert d.cmake_args.startswith("-DGGML_NATIVE=OFF")


def test_working_amx_keeps_the_native_build():
    d = llama_build.decide("cpu", XEON_FLAGS, lambda: llama_build.Probe("works", "tiles ran"))
    assert d.cmake_args == ""
    assert "native build" in d.reason


def test_no_amx_or_not_linux_x86_is_native_without_probing():
    assert llama_build.decide("cpu", {"avx2", "fma"}, must_not_probe).cmake_args == ""
    d = llama_build.decide("metal", None, must_not_probe)
    assert (d.cmake_args, d.backend) == ("-DGGML_METAL=on", "metal")
    assert "not Linux on x86" in d.reason


def test_gpu_backend_adds_its_flag_to_either_build():
    assert llama_build.decide("cuda", {"avx2"}, must_not_probe).cmake_args == "-DGGML_CUDA=on"
    args = llama_build.decide("cuda", XEON_FLAGS, lambda: FAULT).cmake_args.split()
    assert args[0] == "-DGGML_NATIVE=OFF" and args[-2:] == ["-DGGML_CUDA=on", "-DCMAKE_CUDA_ARCHITECTURES=native"]


def test_cmake_args_from_the_environment_are_used_as_given():
    d = llama_build.decide("cuda", XEON_FLAGS, must_not_probe, preset="-DGGML_BLAS=ON")
    assert d.cmake_args == "-DGGML_BLAS=ON -DGGML_CUDA=on"


@pytest.mark.parametrize("raw, expected", [(None, "cpu"), ("cuda", "cuda"), (" Metal ", "metal")])
def test_backend_variable(raw, expected):
    assert llama_build.parse_backend({} if raw is None else {"LLAMA_BACKEND": raw}) == expected


def test_bad_backend_names_the_variable_and_the_accepted_values():
    env = {**os.environ, "LLAMA_BACKEND": "rocm"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "llama_build.py")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "LLAMA_BACKEND='rocm' is not a known backend; accepted values: cpu, cuda, metal" in proc.stderr
    assert proc.stdout == ""


def test_the_pin_comes_from_pyproject_and_keys_the_wheel_folder():
    import llama_cpp

    req = llama_build.llama_requirement()
    assert req == f"llama-cpp-python=={llama_cpp.__version__}"
    key = llama_build.wheel_key("", req, {"avx2", "fma"})
    assert key == llama_build.wheel_key("", req, {"fma", "avx2"})
    assert key != llama_build.wheel_key("-DGGML_NATIVE=OFF", req, {"avx2", "fma"})
    assert key != llama_build.wheel_key("", req, {"avx2", "fma", "avx512f"})  # a native build fits its CPU only


def test_main_prints_args_reason_key_and_pin(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CMAKE_ARGS", "LLAMA_BACKEND")}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "llama_build.py"), "--record",
                           str(tmp_path / "build.json")], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    args, reason, key, req = proc.stdout.split("\n")[:4]
    assert "build" in reason and len(key) == 16 and req.startswith("llama-cpp-python==")
    assert f'"wheel_key": "{key}"' in (tmp_path / "build.json").read_text()


HERE = llama_build.this_machine_flags()
needs_cc = pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="no C++ compiler to build the probe")


@needs_cc
@pytest.mark.skipif(HERE is None, reason="the AMX probe is for Linux on x86")
def test_probe_compiles_and_runs_here():
    result = llama_build.run_probe()
    if "amx_tile" in HERE:
        assert result.status in ("works", "refused", "fault", "wrong"), result
    else:
        assert result == llama_build.Probe("no-amx", "no AMX: CPUID does not report AMX-TILE")


@needs_cc
@pytest.mark.skipif(HERE is None or "amx_tile" in (HERE or ()), reason="needs a Linux x86 CPU without AMX")
def test_probe_reports_a_fault_when_tiles_cannot_run():
    # Forced past the CPUID and permission checks, a CPU without AMX dies with SIGILL: the path a faulting VM takes.
    result = llama_build.run_probe(force=True)
    assert result.status == "fault", result
    assert "signal 4" in result.detail


def test_probe_without_a_compiler_is_unavailable(tmp_path):
    result = llama_build.run_probe(compiler=str(tmp_path / "no-such-cc"))
    assert result.status == "unavailable"


def test_extra_buffer_types_are_auto_by_default_and_the_variable_overrides():
    assert Settings.from_env({}).use_extra_bufts is None
    assert Settings.from_env({"USE_EXTRA_BUFTS": "auto"}).use_extra_bufts is None
    assert Settings.from_env({"USE_EXTRA_BUFTS": "0"}).use_extra_bufts is False
    assert Settings.from_env({"USE_EXTRA_BUFTS": "yes"}).use_extra_bufts is True
    with pytest.raises(SettingsError, match="USE_EXTRA_BUFTS='maybe' is neither auto nor a boolean"):
        Settings.from_env({"USE_EXTRA_BUFTS": "maybe"})


def test_weight_buffers_parses_llama_cpp_load_lines():
    lines = ["load_tensors: loading model tensors, this can take a while... (mmap = true)",
             "load_tensors:   CPU_Mapped model buffer size =    85.30 MiB",
             "load_tensors:   CPU_REPACK model buffer size =    56.95 MiB",
             "load_tensors:        CUDA0 model buffer size =  1024.00 MiB"]
    assert weight_buffers(lines) == {"CPU_Mapped": 85.30, "CPU_REPACK": 56.95, "CUDA0": 1024.0}
    assert weight_buffers(["llama_context: CPU output buffer size = 0.19 MiB"]) == {}


def test_backend_reports_its_weight_buffers(caplog):
    caplog.set_level(logging.INFO, logger="medusa_gguf.backend")
    with Backend(Settings(n_ctx=1024, n_threads=2, use_extra_bufts=True)) as b:
        buffers = b.weight_buffers
        size = b.info.size_bytes
    assert buffers and all(v > 0 for v in buffers.values())
    assert sum(buffers.values()) == pytest.approx(size / 2**20, rel=0.1)
    assert f"weight buffers: {next(iter(buffers))}" in caplog.text


def test_extra_buffer_types_repack_q4_0_weights(tmp_path, model_path):
    q4_0 = tmp_path / "q4_0.gguf"
    quantize(model_path, q4_0, "q4_0", n_threads=2)
    with Backend(Settings(base_model_path=q4_0, n_ctx=1024, n_threads=2, use_extra_bufts=True)) as b:
        assert b.weight_buffers.get("CPU_REPACK", 0) > 0, b.weight_buffers
    with Backend(Settings(base_model_path=q4_0, n_ctx=1024, n_threads=2, use_extra_bufts=False)) as b:
        assert "CPU_REPACK" not in b.weight_buffers, b.weight_buffers


@pytest.fixture(scope="module")
def q4_k(tmp_path_factory, model_path):
    path = tmp_path_factory.mktemp("q4_k") / "q4_k.gguf"
    quantize(model_path, path, "q4_k", n_threads=2)
    return path


def test_repacked_q4_k_weights_are_dropped_because_batched_calls_differ(q4_k, caplog):
    """Q4_K's repacked kernels (gemm from 4 rows on, gemv below) sum in different orders: kept on request, the
    probe sees the difference; on auto the model is loaded again without them and batched calls are exact."""
    with Backend(Settings(base_model_path=q4_k, n_ctx=1024, n_threads=2, use_extra_bufts=True)) as b:
        assert b.weight_buffers.get("CPU_REPACK", 0) > 0 and b.extra_bufts
        assert not b.batch_invariant()
    caplog.set_level(logging.INFO, logger="medusa_gguf.backend")
    with Backend(Settings(base_model_path=q4_k, n_ctx=1024, n_threads=2)) as b:
        assert "CPU_REPACK" not in b.weight_buffers and not b.extra_bufts
        assert b.batch_invariant()
    assert "make a batched call differ from single-token decoding" in caplog.text
    assert "no repacking: with CPU_REPACK" in caplog.text


def test_repacked_q4_0_weights_are_kept_on_auto(tmp_path, model_path):
    q4_0 = tmp_path / "q4_0.gguf"
    quantize(model_path, q4_0, "q4_0", n_threads=2)
    with Backend(Settings(base_model_path=q4_0, n_ctx=1024, n_threads=2)) as b:
        assert b.weight_buffers.get("CPU_REPACK", 0) > 0 and b.extra_bufts
        assert "repacked weights checked" in b.extra_bufts_note


TILED_PROBE = """
from medusa_gguf.backend import Backend
from medusa_gguf.settings import Settings, SettingsError
with Backend(Settings(base_model_path={path!r}, n_ctx=1024, n_threads=2, use_extra_bufts=False)) as b:
    print("invariant", b.batch_invariant())
"""


@pytest.mark.parametrize("tiled, invariant", [("1", False), (None, True)])
def test_tiled_k_quant_matmul_is_switched_off_because_it_sums_differently(q4_k, tiled, invariant):
    """ggml's tiled K-quant matmul (from 8 rows on) breaks batch invariance; the backend switches it off for its
    process (GGML_CPU_TILED_MM=0) unless the variable is set. In a child: ggml reads it once per process."""
    env = {k: v for k, v in os.environ.items() if k != "GGML_CPU_TILED_MM"}
    if tiled is not None:
        env["GGML_CPU_TILED_MM"] = tiled
    ran = subprocess.run([sys.executable, "-c", TILED_PROBE.format(path=str(q4_k))], capture_output=True, text=True,
                         timeout=300, env=env)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert f"invariant {invariant}" in ran.stdout


BATCHED_DECODE = """
from medusa_gguf.backend import Backend
from medusa_gguf.settings import Settings, SettingsError
with Backend(Settings(n_ctx=1024, n_threads=2, use_extra_bufts=True)) as b:
    tokens = b.tokenize("The sea is wide and deep, and ships cross it every day. " * 12)
    b.prefill(tokens[:96])
    b.decode_tree(tokens[96:104], [-1, 0, 1, 2, 0, 4, 5, 1])
    b.commit(3)
    print("decoded", b.n_past, sorted(b.weight_buffers))
"""


def test_this_build_survives_batched_calls_with_extra_buffer_types():
    # A build whose AMX code is broken dies with a protection fault on the first batched matmul, which would take
    # pytest down with it: run it in a child process and ask for its exit status.
    ran = subprocess.run([sys.executable, "-c", BATCHED_DECODE], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert ran.returncode == 0, (f"batched decoding with USE_EXTRA_BUFTS on died (exit {ran.returncode}); "
                                 f"rebuild with scripts/setup.sh, whose probe decides on AMX: {ran.stderr[-800:]}")
    assert ran.stdout.startswith("decoded 100"), ran.stdout
