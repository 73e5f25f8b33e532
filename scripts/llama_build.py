"""Choose llama.cpp's build flags (CMAKE_ARGS for llama-cpp-python) by probing this machine, not by CPU model.

    python3 scripts/llama_build.py [--record FILE]

Prints four lines: the CMAKE_ARGS, why, the wheel-cache key (a hash of the flags, the package and the Python),
and the llama-cpp-python requirement pinned in pyproject.toml. `--record` also writes them as JSON.
The native build (GGML_NATIVE=ON) turns on every instruction set the CPU reports, AMX included. Where AMX code
fails although the CPU reports AMX, llama.cpp dies as soon as the extra buffer types are on: some VMs fault on
tile instructions, and GCC 12 drops the stores that fill llama.cpp's tile configuration (scripts/amx_probe.cpp
says how). So on a Linux x86 CPU that reports amx_tile, scripts/amx_probe.cpp, built by the C++ compiler CMake
would use at -O2, runs tile code written the way llama.cpp writes it; if that fails, the build is
GGML_NATIVE=OFF with every other instruction set the CPU reports named explicitly.
LLAMA_BACKEND=cpu|cuda|metal picks the GPU backend (default cpu); a CMAKE_ARGS already set is used as given.
Standard library only: setup.sh runs this before anything is installed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
PROBE_SOURCE = Path(__file__).with_name("amx_probe.cpp")
# llama.cpp builds Release (-O3); -O2 already shows the dropped-store fault, and -march=native is what it gets.
PROBE_FLAGS = ["-O2", "-march=native", "-mamx-tile", "-mamx-int8"]
BACKENDS = {"cpu": [], "cuda": ["-DGGML_CUDA=on"], "metal": ["-DGGML_METAL=on"]}

# /proc/cpuinfo flag -> ggml option, for a build without GGML_NATIVE. Both spellings of the VNNI flag are accepted.
ISA_OPTIONS = [
    (("sse4_2",), "GGML_SSE42"),
    (("avx",), "GGML_AVX"),
    (("avx2",), "GGML_AVX2"),
    (("fma",), "GGML_FMA"),
    (("f16c",), "GGML_F16C"),
    (("bmi2",), "GGML_BMI2"),
    (("avx512f",), "GGML_AVX512"),
    (("avx512vbmi",), "GGML_AVX512_VBMI"),
    (("avx512_vnni", "avx512vnni"), "GGML_AVX512_VNNI"),
    (("avx512_bf16",), "GGML_AVX512_BF16"),
    (("avx_vnni",), "GGML_AVX_VNNI"),
]
NO_AMX = ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


class BuildError(ValueError):
    """A setting the build cannot use; the message names the variable and the accepted values."""


@dataclass(frozen=True)
class Probe:
    """Outcome of scripts/amx_probe.cpp: works, no-amx, refused, fault, wrong, or unavailable (not compiled)."""

    status: str
    detail: str


@dataclass(frozen=True)
class Decision:
    cmake_args: str
    reason: str
    backend: str


def parse_backend(environ: Mapping[str, str]) -> str:
    raw = environ.get("LLAMA_BACKEND", "cpu")
    value = raw.strip().lower()
    if value not in BACKENDS:
        raise BuildError(f"LLAMA_BACKEND={raw!r} is not a known backend; accepted values: {', '.join(BACKENDS)}")
    return value


def cpu_flags(cpuinfo: str) -> set[str]:
    """The `flags` of the first processor in /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def no_native_args(flags: set[str]) -> list[str]:
    """GGML_NATIVE=OFF with each instruction set on or off as the CPU reports it, and AMX off."""
    isa = [f"-D{opt}={'ON' if any(f in flags for f in names) else 'OFF'}" for names, opt in ISA_OPTIONS]
    return ["-DGGML_NATIVE=OFF", *isa, *NO_AMX]


def decide(backend: str, flags: set[str] | None, probe: Callable[[], Probe], preset: str = "") -> Decision:
    """`flags` is None off Linux x86 (native there); `probe` runs only when the CPU reports amx_tile."""
    gpu = BACKENDS[backend]
    if preset.strip():
        extra = [a for a in gpu if a not in preset]
        return Decision(" ".join([preset.strip(), *extra]), "CMAKE_ARGS is set in the environment: used as given, "
                        "no probe", backend)
    if flags is None:
        return Decision(" ".join(gpu), "not Linux on x86: native build", backend)
    if "amx_tile" not in flags:
        return Decision(" ".join(gpu), "the CPU reports no AMX (no amx_tile in /proc/cpuinfo): native build", backend)
    result = probe()
    if result.status == "works":
        return Decision(" ".join(gpu), f"the CPU reports AMX and the probe ran tiles ({result.detail}): native build",
                        backend)
    # GGML_NATIVE=ON compiles CUDA kernels for the GPUs present only; without it, for a dozen architectures.
    archs = ["-DCMAKE_CUDA_ARCHITECTURES=native"] if backend == "cuda" else []
    return Decision(" ".join(no_native_args(flags) + gpu + archs),
                    f"the CPU reports AMX but the probe failed ({result.status}: {result.detail}): build with GGML_NATIVE=OFF "
                    "with the other instruction sets the CPU reports, AMX off", backend)


def run_probe(source: Path = PROBE_SOURCE, *, force: bool = False, compiler: str | None = None) -> Probe:
    """Compile and run the AMX probe in a scratch folder. A signal or a non-zero exit is a failed probe.

    The compiler is the one CMake would take for llama.cpp's C++ ($CXX, else c++ or g++): the fault can be its."""
    cc = compiler or os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cc:
        return Probe("unavailable", "no C++ compiler (c++, g++ or $CXX) to build scripts/amx_probe.cpp")
    with tempfile.TemporaryDirectory(prefix="amx-probe-") as tmp:
        exe = Path(tmp) / "amx_probe"
        try:
            built = subprocess.run([cc, *PROBE_FLAGS, str(source), "-o", str(exe)],
                                   capture_output=True, text=True, timeout=120)
        except OSError as err:
            return Probe("unavailable", f"could not run the C++ compiler {cc}: {err}")
        if built.returncode != 0:
            last = (built.stderr.strip().splitlines() or ["no output"])[-1]
            return Probe("unavailable", f"{cc} could not compile {source.name}: {last}")
        try:
            ran = subprocess.run([str(exe), *(["--force"] if force else [])],
                                 capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            return Probe("fault", "the probe hung for 30 s")
    said = ran.stdout.strip() or "no output"
    if ran.returncode < 0:
        return Probe("fault", f"killed by signal {-ran.returncode} running tile code built with {' '.join(PROBE_FLAGS)}")
    status = {0: "works", 3: "no-amx", 4: "refused"}.get(ran.returncode, "wrong")
    return Probe(status, said)


def llama_requirement(pyproject: Path = PYPROJECT) -> str:
    """The llama-cpp-python pin from pyproject.toml, so the version is written in one place."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pins = [d for d in deps if d.replace("_", "-").lower().startswith("llama-cpp-python==")]
    if len(pins) != 1:
        raise BuildError(f"{pyproject} should pin llama-cpp-python with == exactly once; found {pins or 'none'}")
    return pins[0].replace(" ", "")


def this_machine_flags() -> set[str] | None:
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return None
    try:
        return cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return set()


def wheel_key(cmake_args: str, requirement: str, flags: set[str] | None) -> str:
    """Folder name of the wheel built with these flags: pip's own cache ignores CMAKE_ARGS. The CPU's flags count
    too: a native build made on one CPU may not run on another that shares this home folder."""
    cpu = " ".join(sorted(flags or ()))
    tag = f"{requirement}|{cmake_args}|{cpu}|{sys.implementation.cache_tag}|{platform.machine()}"
    return hashlib.sha256(tag.encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=Path, help="also write the decision as JSON to this file")
    args = parser.parse_args(argv)
    try:
        backend = parse_backend(os.environ)
        requirement = llama_requirement()
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    flags = this_machine_flags()
    decision = decide(backend, flags, run_probe, os.environ.get("CMAKE_ARGS", ""))
    key = wheel_key(decision.cmake_args, requirement, flags)
    if args.record:
        record = {**asdict(decision), "requirement": requirement, "wheel_key": key}
        args.record.write_text(json.dumps(record, indent=2) + "\n")
    print(decision.cmake_args)
    print(decision.reason)
    print(key)
    print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main())
