"""This machine: CPU, instruction set, clock, theoretical and measured peak FLOP/s, versions.

    python -m benchmarks.machine [--threads 2] [--seconds 2] [--json OUT]

Theoretical peak per core and cycle (FLOPs, one multiply-accumulate = 2):

    fp32  = FMA pipes x (datapath bits / 32) x 2
    int8  = dot-product pipes x (datapath bits / 8) x 2          (AVX-512 VNNI / AVX-VNNI / Arm dotprod)
            AMX-INT8: 1024 MACs per cycle per core (one TMUL), i.e. 2048
            no int8 dot product: (datapath bits / 16) x 2 per pipe (pmaddubsw + pmaddwd chains)
    peak  = per-cycle x clock x cores used (= min(threads, physical cores))

Datapaths: Intel with AVX-512: 512-bit, 2 FMA pipes (Xeon Gold 6xxx/Platinum and newer; some
lower parts have 1: the figure is then 2x too high); AMD Zen 4 (family 0x19 with AVX-512): 512-bit
instructions on a 256-bit datapath, 2 FMA pipes; Zen 5 (family 0x1a): 512-bit, 2 pipes; AVX2 + FMA:
256-bit, 2 pipes; aarch64 NEON (Cortex-A78, Jetson Orin): 128-bit, 2 pipes (the SVE width when
present). Clock: the maximum frequency when the OS reports one (lscpu / cpufreq), else
/proc/cpuinfo's "cpu MHz" (often the nominal clock in a VM: a CPU that boosts above it can measure
more than this "peak").

Measured ceiling: ONNX Runtime (the engine the detector runs on) on one large square MatMul (fp32)
and MatMulInteger (uint8 x int8 -> int32, its VNNI/AMX kernels) with ``threads`` intra-op threads,
repeated for about ``seconds`` each; the best repetition counts (a ceiling, not a typical value).
"""
from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ISA_FLAGS = ("sse4_2", "avx", "fma", "avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd", "asimddp", "sve", "sve2", "i8mm")
DISTRIBUTIONS = ("numpy", "onnx", "onnxruntime", "openvino", "torch", "tensorrt", "tensorrt_rtx_cu12",
                 "opencv-python-headless", "matplotlib")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    vendor: str
    arch: str
    family: int | None
    logical_cpus: int
    physical_cores: int
    flags: tuple[str, ...]            # the ISA_FLAGS this CPU has
    mhz: float | None
    mhz_source: str


@dataclass(frozen=True)
class Peak:
    """Theoretical peak for ``cores`` cores; per_cycle = FLOPs (or int8 ops) per core per cycle."""

    datapath_bits: int
    fma_pipes: int
    fp32_per_cycle: int
    int8_per_cycle: int
    int8_kind: str                    # "amx" | "vnni" | "dotprod" | "no dot product"
    cores: int
    ghz: float | None
    fp32_gflops: float | None
    int8_gops: float | None
    assumptions: str = field(default="")


# ----------------------------------------------------------------------------- CPU

def _cpuinfo_fields(text: str) -> dict[str, str]:
    """The first processor's "key: value" lines of /proc/cpuinfo."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if out:
                break
            continue
        key, _, value = line.partition(":")
        out.setdefault(key.strip().lower(), value.strip())
    return out


def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def _max_mhz(lscpu: dict[str, str], info: dict[str, str]) -> tuple[float | None, str]:
    """(MHz, where it came from): lscpu max, cpufreq max, else /proc/cpuinfo's cpu MHz."""
    try:
        return float(lscpu["cpu max mhz"]), "lscpu CPU max MHz"
    except (KeyError, ValueError):
        pass
    freq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    try:
        return int(freq.read_text()) / 1000.0, str(freq)
    except (OSError, ValueError):
        pass
    try:
        return float(info["cpu mhz"]), "/proc/cpuinfo cpu MHz (current/nominal; no max reported)"
    except (KeyError, ValueError):
        return None, "unknown"


def parse_cpu(cpuinfo: str, lscpu: dict[str, str], logical: int, arch: str) -> CpuInfo:
    """CpuInfo from the text of /proc/cpuinfo and the parsed lscpu output."""
    info = _cpuinfo_fields(cpuinfo)
    flags = set((info.get("flags") or info.get("features") or "").split())
    try:
        cores = int(lscpu["core(s) per socket"]) * int(lscpu.get("socket(s)", "1"))
    except (KeyError, ValueError):
        cores = int(info.get("cpu cores", logical) or logical)
    try:
        family = int(info["cpu family"])
    except (KeyError, ValueError):
        family = None
    mhz, source = _max_mhz(lscpu, info)
    model = info.get("model name") or lscpu.get("model name") or platform.processor() or arch
    return CpuInfo(model, info.get("vendor_id") or lscpu.get("vendor id", ""), arch, family, logical,
                   max(1, min(cores, logical)), tuple(f for f in ISA_FLAGS if f in flags), mhz, source)


def read_cpu() -> CpuInfo:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return parse_cpu(text, _lscpu(), os.cpu_count() or 1, platform.machine())


def peak(cpu: CpuInfo, threads: int) -> Peak:
    """The theoretical fp32 and int8 peak of ``threads`` threads (one per physical core at most)."""
    f = set(cpu.flags)
    amd = "amd" in cpu.vendor.lower()
    if "avx512f" in f:
        bits = 256 if amd and cpu.family == 0x19 else 512
        note = "AMD Zen 4: AVX-512 on a 256-bit datapath" if bits == 256 else "AVX-512, 2 FMA pipes assumed"
    elif "avx2" in f and "fma" in f:
        bits, note = 256, "AVX2 + FMA, 2 pipes"
    elif cpu.arch in ("aarch64", "arm64"):
        bits, note = 128, "NEON 128-bit, 2 FMA pipes assumed"
    else:
        bits, note = 128, "SSE 128-bit, no FMA: mul + add pipes"
    pipes = 2
    fp32 = pipes * bits // 32 * 2
    if "amx_int8" in f:
        int8, kind = 2048, "amx"
    elif f & {"avx512_vnni", "avx_vnni"}:
        int8, kind = pipes * bits // 8 * 2, "vnni"
    elif "asimddp" in f:
        int8, kind = pipes * bits // 8 * 2, "dotprod"
    else:
        int8, kind = pipes * bits // 16 * 2, "no dot product"
    cores = max(1, min(threads, cpu.physical_cores))
    ghz = cpu.mhz / 1000.0 if cpu.mhz else None
    gf = round(fp32 * ghz * cores, 1) if ghz else None
    gi = round(int8 * ghz * cores, 1) if ghz else None
    return Peak(bits, pipes, fp32, int8, kind, cores, ghz and round(ghz, 3), gf, gi,
                f"{note}; clock from {cpu.mhz_source}")


# ----------------------------------------------------------------------------- measured ceiling

def _matmul_model(n: int, int8: bool):
    from onnx import TensorProto, helper

    if int8:
        a = helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])
        b = helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])
        y = helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])
        node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
    else:
        a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])
        b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
    graph = helper.make_graph([node], "matmul", [a, b], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def measure_matmul(n: int, int8: bool, threads: int, seconds: float) -> dict[str, float]:
    """Best and median GFLOP/s (GOP/s for int8) of an n x n x n product on ONNX Runtime."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(_matmul_model(n, int8).SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    if int8:
        feeds = {"a": rng.integers(0, 255, (n, n), dtype=np.uint8), "b": rng.integers(-127, 127, (n, n), dtype=np.int8)}
    else:
        feeds = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    sess.run(None, feeds)
    times, start = [], time.perf_counter()
    while not times or (time.perf_counter() - start < seconds and len(times) < 1000):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    ops = 2.0 * n ** 3 / 1e9
    return {"size": n, "runs": len(times), "best": round(ops / min(times), 1),
            "median": round(ops / float(np.median(times)), 1)}


# ----------------------------------------------------------------------------- versions

def versions() -> dict[str, str | None]:
    """Python and the installed versions of the packages a benchmark touches (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def gpu() -> dict[str, Any] | None:
    """The first CUDA GPU (name, compute capability, memory), or None."""
    try:
        from engines import cuda

        if not cuda.available():
            return None
        d = cuda.device_info(0)
        return {"name": d.name, "compute_capability": list(d.compute_capability),
                "memory_gb": round(d.total_memory / 2 ** 30, 1)}
    except Exception:  # no cuda-python, no driver: no GPU as far as benchmarks go
        return None


def describe(threads: int, seconds: float = 2.0, size: int = 1024, measure: bool = True) -> dict[str, Any]:
    """Everything about this machine a report needs (see the module docstring)."""
    cpu = read_cpu()
    p = peak(cpu, threads)
    out: dict[str, Any] = {
        "cpu": {**asdict(cpu), "flags": list(cpu.flags)}, "threads": threads,
        "peak": asdict(p), "os": platform.platform(), "hostname": platform.node(),
        "versions": versions(), "gpu": gpu(),
        "env_threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
    }
    if measure:
        fp = measure_matmul(size, False, threads, seconds)
        i8 = measure_matmul(size, True, threads, seconds)
        out["measured"] = {"engine": "onnxruntime", "fp32_gflops": fp["best"], "int8_gops": i8["best"],
                           "fp32": fp, "int8": i8,
                           # the clock the fp32 GEMM would need at the assumed FLOPs/cycle: above the
                           # reported clock means the CPU boosts (or the per-cycle figure is too low)
                           "implied_ghz_fp32": round(fp["best"] / (p.fp32_per_cycle * p.cores), 2)}
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.machine", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for the peak and the GEMM")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per measured GEMM")
    p.add_argument("--size", type=int, default=1024, help="GEMM size n (n x n x n)")
    p.add_argument("--measure", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the peak FLOP/s (a few seconds); --no-measure: only describe")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the description as JSON")
    return p


def main(args: argparse.Namespace) -> int:
    import json

    from common.atomic import atomic_write_json

    if args.threads < 1 or args.size < 16 or args.seconds <= 0:
        print("benchmarks.machine: need --threads >= 1, --size >= 16, --seconds > 0", file=sys.stderr)
        return 2
    out = describe(args.threads, args.seconds, args.size, args.measure)
    print(json.dumps(out, indent=2))
    if args.json:
        atomic_write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
