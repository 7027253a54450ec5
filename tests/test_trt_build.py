"""engines.build with TensorRT-RTX on this CPU (ahead-of-time builds, no GPU): FP32, INT8 and FP16
engines from the toy packages (and the shipped INT8 one when models/ has it), engine.json contents,
refusals on load (other package, other TensorRT version, modified plan, tampered package, newer
format), clear CLI errors (no TensorRT, corrupt ONNX, parser errors, existing --out) and no partial
output on failure. Running a plan needs a GPU: that part is `gpu`-marked.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import engines
from common import package as pkg
from engines import build, cuda
from engines.manifest import ENGINE_FORMAT_VERSION, ENGINE_JSON, load_reference
from toy_package import (
    REPO, assert_close, config_of, copy_package, make_toy_packages, package_path, random_inputs,
    reference_detector, rewrite_file, shipped_packages,
)

try:
    import tensorrt_rtx  # noqa: F401
    HAS_RTX = True
except ImportError:
    HAS_RTX = False
NO_RTX = "TensorRT-RTX is not installed (pip install tensorrt-rtx-cu12)"


def needs_rtx(test):
    return pytest.mark.trt(pytest.mark.skipif(not HAS_RTX, reason=NO_RTX)(test))


# (package id, requested precision, expected {graph: precision}). Of the shipped packages the INT8
# one, which runtime.detect and the README run: its graphs hold every op of the FP32 package plus
# the Q/DQ pairs (a shipped FP32 build took another 10 s and tested no other parser path).
BUILDS = [("toy", "fp32", {"text": "fp32", "detector": "fp32"}),
          ("toy-int8", "auto", {"text": "int8", "detector": "int8"}),
          ("toy", "fp16", {"text": "fp16", "detector": "fp16"})]
BUILDS += [(p.name, "int8", None) for p in shipped_packages() if p.name.endswith("-int8")]


def _cli(*args: str, block_tensorrt: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m engines.build ARGS``; with block_tensorrt, as if `tensorrt` were not installed."""
    prelude = "import sys; sys.modules['tensorrt'] = None; " if block_tensorrt else "import sys; "
    code = prelude + ("import runpy; sys.argv[0] = 'engines.build'; "
                      "runpy.run_module('engines.build', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    return make_toy_packages(tmp_path_factory.mktemp("toys"))


@pytest.fixture(scope="module")
def built(toys, tmp_path_factory):
    """{(package id, precision): engine folder}, built once for the module."""
    if not HAS_RTX:
        pytest.skip(NO_RTX)
    root = tmp_path_factory.mktemp("engines")
    out = {}
    for package_id, precision, _ in BUILDS:
        cfg = build.BuildConfig(package=str(package_path(package_id, toys)), backend="tensorrt-rtx",
                                precision=precision, out=str(root / f"{package_id}-{precision}"))
        out[package_id, precision] = build.build_engines(cfg)
    return out


# ----------------------------------------------------------------------------- no TensorRT at all

def test_cli_without_tensorrt_says_what_to_install(toys):
    r = _cli("--package", str(toys["toy"]), "--backend", "tensorrt", "--out", str(toys["toy"].parent / "x"),
             block_tensorrt=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "TensorRT is not installed" in r.stderr and "pip install tensorrt-cu12" in r.stderr
    assert "python3-libnvinfer" in r.stderr and "Traceback" not in r.stderr
    assert not (toys["toy"].parent / "x").exists()


# ----------------------------------------------------------------------------- builds

@pytest.mark.parametrize("package_id,precision,expected", BUILDS, ids=[f"{b[0]}-{b[1]}" for b in BUILDS])
@needs_rtx
def test_build_writes_a_complete_engine(built, toys, package_id, precision, expected):
    engine_dir = built[package_id, precision]
    package = package_path(package_id, toys)
    engine = json.loads((engine_dir / ENGINE_JSON).read_text())
    manifest = pkg.load_package_manifest(package)
    import tensorrt_rtx

    assert engine["format_version"] == ENGINE_FORMAT_VERSION and engine["backend"] == "tensorrt-rtx"
    assert engine["tensorrt"]["version"] == tensorrt_rtx.__version__
    assert engine["device"] == {"name": None, "compute_capability": None, "targets": "default"}
    assert engine["package"]["digest"] == pkg.package_digest(manifest)
    assert engine["package"]["files"] == {n: i["sha256"] for n, i in manifest["files"].items()}
    assert Path(engine_dir / engine["package"]["path"]).resolve() == package.resolve()
    if expected:
        assert engine["graph_precision"] == expected
    else:  # a shipped INT8 package (compress.quantize + export, modelopt's Q/DQ): an int8 detector;
        # its text graph has no Q/DQ (FP32 by rule, int8 word table only), so TensorRT-RTX runs it fp16
        assert engine["graph_precision"] == {"text": "fp16", "detector": "int8"}
    assert engine["build"]["timing_cache"] is None and not (engine_dir / build.TIMING_CACHE).exists()
    for graph, entry in engine["graphs"].items():
        plan = (engine_dir / entry["plan"]).read_bytes()
        assert len(plan) > 1000 and hashlib.sha256(plan).hexdigest() == entry["sha256"]
        assert entry["inputs"] == manifest["graphs"][graph]["inputs"]
    buckets = manifest["text"]["buckets"]
    lows = [1] + [b + 1 for b in buckets[:-1]]
    assert [p["tokens"] for p in engine["graphs"]["text"]["profiles"]] == [[lo, b] for lo, b in zip(lows, buckets)]
    last = engine["graphs"]["detector"]["profiles"][-1]["shapes"]
    assert last[pkg.ATTENTION_MASK] == {"min": [1, lows[-1]], "opt": [1, buckets[-1]], "max": [1, buckets[-1]]}
    assert _leftovers(engine_dir.parent) == []


@needs_rtx
@pytest.mark.parametrize("package_id,quant", [("toy", None), ("toy-int8", "int8")])
def test_qdq_is_detected_in_the_parsed_network(toys, package_id, quant):
    rt = build.TensorRT("tensorrt-rtx")
    builder = rt.trt.Builder(rt.logger)
    network, _parser = build._parse(rt, builder, package_path(package_id, toys) / "detector.onnx", None)
    assert build.quantization_of(rt, network) == quant


# ----------------------------------------------------------------------------- refusals on load

def _edit_engine(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    engine = json.loads((dst / ENGINE_JSON).read_text())
    edit(engine)
    engine["package"]["path"] = str((src / engine["package"]["path"]).resolve())
    (dst / ENGINE_JSON).write_text(json.dumps(engine))
    return dst


@needs_rtx
def test_engine_from_another_package_is_refused(built, toys):
    engine_dir = built["toy-int8", "auto"]
    with pytest.raises(engines.EngineMismatch) as err:
        engines.load(engine_dir, package=str(toys["toy"]))
    message = str(err.value)
    assert "built from package 'toy-int8'" in message and "'toy'" in message
    assert f"rebuild it with: python -m engines.build --package {toys['toy']} --backend tensorrt-rtx" in message
    assert err.value.rebuild_command.endswith(f"--out {engine_dir} --overwrite")


@needs_rtx
def test_engine_from_another_tensorrt_version_is_refused(built, tmp_path):
    def older(engine):
        engine["tensorrt"]["version"] = "1.0.0.1"

    engine_dir = _edit_engine(built["toy", "fp32"], tmp_path / "old", older)
    with pytest.raises(engines.EngineMismatch, match=r"built with tensorrt-rtx 1\.0\.0\.1, but 1\.\d.* is installed"
                       r"[\s\S]*rebuild it with: python -m engines.build .* --precision fp32"):
        engines.load(engine_dir)


@needs_rtx
def test_modified_plan_is_refused(built, tmp_path):
    engine_dir = _edit_engine(built["toy", "fp32"], tmp_path / "mod", lambda e: None)
    plan = bytearray((engine_dir / "detector.plan").read_bytes())
    plan[len(plan) // 2] ^= 0xFF
    (engine_dir / "detector.plan").write_bytes(bytes(plan))
    with pytest.raises(engines.EngineMismatch, match="detector.plan: sha256 does not match engine.json"):
        engines.load(engine_dir)


@needs_rtx
def test_tampered_package_is_refused(built, toys, tmp_path):
    package = copy_package(toys["toy"], tmp_path / "pkg")
    data = bytearray((package / "text.onnx").read_bytes())
    data[100] ^= 0xFF
    (package / "text.onnx").write_bytes(bytes(data))
    with pytest.raises(engines.PackageInvalid, match="text.onnx: sha256 .* does not match the manifest"):
        engines.load(built["toy", "fp32"], package=str(package))


@needs_rtx
def test_newer_engine_format_is_refused(built, tmp_path):
    engine_dir = _edit_engine(built["toy", "fp32"], tmp_path / "new", lambda e: e.update(format_version=99))
    with pytest.raises(engines.EngineError, match="engine format_version 99 is newer"):
        engines.load(engine_dir)


@needs_rtx
def test_valid_engine_runs_on_a_gpu_or_says_it_needs_one(built, toys):
    engine_dir = built["toy-int8", "auto"]
    if not cuda.available():
        with pytest.raises(engines.EngineError, match="running a TensorRT engine needs an NVIDIA GPU"):
            engines.load(engine_dir)
        return
    _run_against_reference(engine_dir, toys["toy-int8"])


def _run_against_reference(engine_dir: Path, package: Path) -> None:
    manifest = pkg.load_package_manifest(package)
    with engines.load(engine_dir) as e:
        for graph in ("text", "detector"):
            ref = load_reference(package, manifest, graph)
            out = getattr(e, graph).run({s.name: ref[s.name] for s in getattr(e, graph).inputs})
            for name, value in out.items():
                assert_close(value, ref[name], 0.02, f"TensorRT {graph}.{name}")


@needs_rtx
@pytest.mark.gpu
@pytest.mark.parametrize("key", [("toy", "fp32"), ("toy", "fp16"), ("toy-int8", "auto")])
def test_engines_match_reference_on_a_gpu(built, toys, key):
    if not cuda.available():
        pytest.skip("running TensorRT engines needs a CUDA GPU (none here)")
    _run_against_reference(built[key], toys[key[0]])


# ----------------------------------------------------------------------------- bad input, no leftovers

@needs_rtx
def test_corrupt_onnx_is_reported_and_leaves_nothing(toys, tmp_path):
    package = copy_package(toys["toy"], tmp_path / "corrupt")
    rewrite_file(package, "detector.onnx", b"\x08\x07garbage, not a protobuf")
    r = _cli("--package", str(package), "--backend", "tensorrt-rtx", "--out", str(tmp_path / "eng"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "detector.onnx: the ONNX parser of tensorrt-rtx" in r.stderr and "node" in r.stderr
    assert not (tmp_path / "eng").exists() and _leftovers(tmp_path) == []


@needs_rtx
def test_parser_errors_name_the_node(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("NoSuchOpInOnnx", ["x"], ["y"], name="the_bad_node")
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "bad.onnx")
    rt = build.TensorRT("tensorrt-rtx")
    expected = r"bad.onnx: the ONNX parser .*\n  node 0 'the_bad_node' \(NoSuchOpInOnnx\)"
    with pytest.raises(engines.BuildError, match=expected):
        build._parse(rt, rt.trt.Builder(rt.logger), tmp_path / "bad.onnx", None)


def test_newer_package_format_is_refused_by_the_cli(toys, tmp_path):
    package = copy_package(toys["toy"], tmp_path / "newer")
    manifest = json.loads((package / pkg.MANIFEST).read_text())
    manifest["format_version"] = 2
    (package / pkg.MANIFEST).write_text(json.dumps(manifest))
    r = _cli("--package", str(package), "--backend", "tensorrt-rtx", "--out", str(tmp_path / "eng"))
    assert r.returncode == 2 and "format_version 2 is newer" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "eng").exists()


@needs_rtx
def test_failed_build_leaves_no_partial_engine(toys, tmp_path, monkeypatch):
    real = build._build_plan

    class OutOfMemory:  # what TensorRT's builder does when it runs out: log an error, return None
        def __init__(self, rt):
            self.rt = rt

        def build_serialized_network(self, network, config):
            self.rt.logger.errors.append("Requested amount of GPU memory (1099511627776 bytes) could not be allocated")
            return None

    def fail_on_detector(rt, builder, network, config, path):
        return real(rt, OutOfMemory(rt) if path.name == "detector.onnx" else builder, network, config, path)

    monkeypatch.setattr(build, "_build_plan", fail_on_detector)
    cfg = build.BuildConfig(package=str(toys["toy"]), backend="tensorrt-rtx", precision="fp32",
                            out=str(tmp_path / "eng"))
    with pytest.raises(engines.BuildError, match=r"detector.onnx: .* could not build .*out of memory\?"):
        build.build_engines(cfg)
    assert not (tmp_path / "eng").exists() and _leftovers(tmp_path) == []


@needs_rtx
def test_unsupported_precision_for_the_device(toys):
    rt = build.TensorRT("tensorrt-rtx")
    orin = cuda.DeviceInfo(0, "Orin", (8, 7), 0)
    with pytest.raises(engines.BuildError, match=r"fp8 needs compute capability >= 8.9; this device \(Orin\) has 8.7"):
        build._check_request("fp8", {"text": None, "detector": "fp8"}, "pkg", orin, None, rt)
    with pytest.raises(engines.BuildError, match="--precision int8: package pkg has no INT8 Q/DQ nodes"):
        build._check_request("int8", {"text": None, "detector": None}, "pkg", orin, None, rt)
    with pytest.raises(engines.BuildError, match="quantised .*INT8 Q/DQ.*for fp16 build the FP32 package"):
        build.graph_precision("fp16", "int8", "pkg", Path("detector.onnx"))


@needs_rtx
def test_existing_out_is_refused_without_overwrite(built, toys):
    engine_dir = built["toy", "fp32"]
    r = _cli("--package", str(toys["toy"]), "--backend", "tensorrt-rtx", "--out", str(engine_dir))
    assert r.returncode == 2 and "already exists; pass --overwrite" in r.stderr


def test_profiles_cover_each_bucket():
    specs = [engines.TensorSpec("image", ("batch", 3, 32, 32), np.dtype("float32")),
             engines.TensorSpec("attention_mask", ("batch", "tokens"), np.dtype("int64"))]
    profiles = build.profiles_for(specs, (16, 32))
    assert [p["tokens"] for p in profiles] == [[1, 16], [17, 32]]
    assert profiles[1]["shapes"]["image"] == {"min": [1, 3, 32, 32], "opt": [1, 3, 32, 32], "max": [1, 3, 32, 32]}
    assert profiles[1]["shapes"]["attention_mask"] == {"min": [1, 17], "opt": [1, 32], "max": [1, 32]}
    with pytest.raises(engines.BuildError, match="dynamic dimension 'height'"):
        build.profiles_for([engines.TensorSpec("x", ("batch", "height"), np.dtype("float32"))], (16,))


# ----------------------------------------------------------------------------- the runner, on fakes
# The GPU path (TrtEngine.run over engines.cuda) cannot run here, so its logic (profile choice,
# buffer sizes, copies, shapes, lifetimes) runs against a host-memory CUDA runtime and a fake
# TensorRT context that computes with ONNX Runtime. Real TensorRT is covered by the gpu tests.

class HostMemoryCuda:
    """cuda.bindings.runtime look-alike: 'device' memory is host memory, copies are memmove."""

    class cudaError_t:
        cudaSuccess = 0

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self):
        self.blocks = {}

    def _alloc(self, nbytes):
        buf = ctypes.create_string_buffer(nbytes)
        self.blocks[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def _free(self, ptr):
        del self.blocks[ptr]
        return (0,)

    cudaMalloc = cudaMallocHost = _alloc
    cudaFree = cudaFreeHost = _free

    def cudaStreamCreate(self):
        return 0, 12345

    def cudaStreamDestroy(self, stream):
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        ctypes.memmove(dst, src, nbytes)
        return (0,)


def _array_at(ptr, shape, dtype):
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    return np.frombuffer((ctypes.c_byte * n).from_address(ptr), dtype=dtype).reshape(shape)


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.profile, self.outputs = engine, {}, {}, None, None

    def set_optimization_profile_async(self, index, stream):
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        s = self.engine.profiles[self.profile]["shapes"][name]
        self.shapes[name] = tuple(shape)
        return all(lo <= d <= hi for lo, d, hi in zip(s["min"], shape, s["max"]))

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def get_tensor_shape(self, name):
        if self.outputs is None:  # all inputs are on the 'device' by now
            feeds = {s.name: _array_at(self.addresses[s.name], self.shapes[s.name], s.dtype).copy()
                     for s in self.engine.inputs}
            self.outputs = self.engine.ort.run(feeds)
        return self.outputs[name].shape

    def execute_async_v3(self, stream):
        for name, value in self.outputs.items():
            _array_at(self.addresses[name], value.shape, value.dtype)[...] = value
        self.outputs = None
        return True


class FakeTensorRT:
    backend = "tensorrt-rtx"

    def __init__(self, ort_engine, profiles):
        self.ort, self.profiles = ort_engine, profiles
        self.inputs, self.outputs = ort_engine.inputs, ort_engine.outputs
        self.trt = types.SimpleNamespace(nptype=lambda dtype: dtype)
        self.contexts = []
        self.num_optimization_profiles = len(profiles)

    def runtime(self):
        return types.SimpleNamespace(deserialize_cuda_engine=lambda plan: self)

    def errors(self):
        return []

    def get_tensor_dtype(self, name):
        return next(s.dtype for s in self.inputs + self.outputs if s.name == name)

    def create_execution_context(self):
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


def test_trt_runner_logic_on_fakes(toys, monkeypatch):
    from engines.trt import TrtEngine

    fake_cuda = HostMemoryCuda()
    monkeypatch.setattr(cuda, "_rt", fake_cuda)
    with engines.load(toys["toy"], cache_dir="") as e:
        profiles = build.profiles_for(e.detector.inputs, (16, 32, 64))
        fake = FakeTensorRT(e.detector, profiles)
        runner = TrtEngine(fake, b"plan", "detector.plan", e.detector.inputs, e.detector.outputs, profiles)
        x = random_inputs(config_of(toys["toy"]), tokens=20)
        hidden = e.encode_text(x[pkg.INPUT_IDS], x[pkg.ATTENTION_MASK])
        feeds = {pkg.IMAGE: x[pkg.IMAGE], pkg.TEXT_HIDDEN: hidden, pkg.ATTENTION_MASK: x[pkg.ATTENTION_MASK]}
        ref = reference_detector(config_of(toys["toy"]), x[pkg.IMAGE], hidden, x[pkg.ATTENTION_MASK])
        for _ in range(2):  # the second call reuses the context and the buffers
            out = runner.run(feeds)
            for name in ref:
                assert_close(out[name], ref[name], 1e-4, name)
        assert [c.profile for c in fake.contexts] == [1]            # 20 tokens -> the (17, 32) profile
        short = {**feeds, pkg.TEXT_HIDDEN: hidden[:, :4], pkg.ATTENTION_MASK: x[pkg.ATTENTION_MASK][:, :4]}
        assert runner.run(short)[pkg.TOKEN_LOGITS].shape == (1, 16, 4)
        assert [c.profile for c in fake.contexts] == [1, 0]
        too_long = {**feeds, pkg.TEXT_HIDDEN: np.zeros((1, 65, 16), np.float32),
                    pkg.ATTENTION_MASK: np.ones((1, 65), np.int64)}
        with pytest.raises(engines.InputError, match=r"65 tokens is outside every optimisation profile"):
            runner.run(too_long)
        runner.close()
    assert fake_cuda.blocks == {}                                    # every buffer and stream freed
