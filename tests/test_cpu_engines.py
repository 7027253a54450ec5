"""CPU engines (engines/cpu_engine.py): ``engines.build --backend onnxruntime|openvino`` on the toy
packages, run through ``engines.load`` and ``runtime.detect --engine``, equal to the package run
directly, and refused like TensorRT engines when the package, the runtime version or a file changed.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import engines
from common import package as pkg
from engines import build as build_cli
from engines.manifest import ENGINE_JSON
from runtime import detect
from runtime.predictor import Detector
from toy_package import make_toy_packages

BACKENDS = ("onnxruntime", "openvino")


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    return make_toy_packages(tmp_path_factory.mktemp("toys"))


def build(package, backend, out, *extra):
    args = build_cli.get_args_parser().parse_args(["--package", str(package), "--backend", backend,
                                                   "--out", str(out), *map(str, extra)])
    return build_cli.main(args)


@pytest.fixture(scope="module")
def built(toys, tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    out = {}
    for name in ("toy", "toy-int8"):
        for backend in BACKENDS:
            assert build(toys[name], backend, root / f"{name}-{backend}") == 0
            out[name, backend] = root / f"{name}-{backend}"
    return out


@pytest.mark.parametrize("name", ["toy", "toy-int8"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cpu_engine_equals_the_package(toys, built, name, backend):
    engine_dir = built[name, backend]
    record = json.loads((engine_dir / ENGINE_JSON).read_text())
    assert record["backend"] == backend and record["runtime"]["version"]
    assert record["package"]["digest"] == pkg.package_digest(pkg.read_manifest(toys[name]))
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    with Detector(engine_dir) as from_engine, Detector(toys[name], backend=backend) as from_package:
        assert from_engine.backend == backend
        a, b = (d.detect(image, "person. red mug") for d in (from_engine, from_package))
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(a.scores, b.scores, atol=2e-3)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=0.5)


def test_openvino_engine_holds_the_compiled_models(built):
    engine_dir = built["toy-int8", "openvino"]
    assert list((engine_dir / "cache").iterdir())  # compiled at build time, loaded from there
    assert (engine_dir / "detector.xml").is_file() and (engine_dir / "detector.bin").is_file()


@pytest.mark.parametrize("backend", BACKENDS)
def test_runtime_detect_runs_a_cpu_engine(built, tmp_path, capsys, backend):
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "x.png")
    rc = detect.main(detect.get_args_parser().parse_args(
        ["--engine", str(built["toy", backend]), str(tmp_path / "x.png"), "--prompt", "cat", "--json", "-",
         "--threads", "1"]))
    out, err = capsys.readouterr()
    assert rc == 0 and json.loads(out)["phrases"] == ["cat"]
    assert err.splitlines()[0] == f"fiber-detect: toy on {backend}, 1 threads"


def _copy(built, key, tmp_path):
    return shutil.copytree(built[key], tmp_path / "engine")


@pytest.mark.parametrize("backend", BACKENDS)
def test_refused_when_the_package_changed(toys, built, tmp_path, backend):
    package = shutil.copytree(toys["toy"], tmp_path / "pkg")
    engine_dir = tmp_path / "engine"
    assert build(package, backend, engine_dir) == 0
    manifest = json.loads((package / pkg.MANIFEST).read_text())
    manifest["files"][pkg.TOKENIZER]["sha256"] = "0" * 64  # as if re-exported with another tokenizer
    (package / pkg.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(engines.EngineMismatch) as e:
        engines.load(engine_dir, verify=False)
    assert "differs in ['tokenizer.json']" in str(e.value)
    assert f"python -m engines.build --package {package} --backend {backend}" in str(e.value)
    assert e.value.rebuild_command.endswith(f"--out {engine_dir} --overwrite")


@pytest.mark.parametrize("backend", BACKENDS)
def test_refused_when_the_runtime_version_differs(built, tmp_path, backend):
    engine_dir = _copy(built, ("toy", backend), tmp_path)
    record = json.loads((engine_dir / ENGINE_JSON).read_text())
    record["runtime"]["version"] = "0.0.1"
    (engine_dir / ENGINE_JSON).write_text(json.dumps(record))
    with pytest.raises(engines.EngineMismatch, match=f"built with {backend} 0.0.1, but .* is installed") as e:
        engines.load(engine_dir)
    assert "rebuild it with: python -m engines.build" in str(e.value)


def test_refused_when_a_model_file_was_modified(built, tmp_path):
    engine_dir = _copy(built, ("toy", "onnxruntime"), tmp_path)
    with open(engine_dir / "detector.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(engines.EngineMismatch, match="detector.onnx: sha256 does not match engine.json"):
        engines.load(engine_dir)


def test_refused_for_another_backend_or_option(built):
    with pytest.raises(engines.EngineError, match="holds a onnxruntime engine, not openvino"):
        engines.load(built["toy", "onnxruntime"], "openvino")
    with pytest.raises(engines.EngineError, match="unknown option"):
        engines.load(built["toy", "onnxruntime"], device=1)


def test_tensorrt_only_flags_are_refused_for_cpu_engines(toys, tmp_path, capsys):
    assert build(toys["toy-int8"], "ort", tmp_path / "e", "--precision", "fp16") == 2
    assert "--precision apply to TensorRT builds only" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    assert build(toys["toy"], "openvino", tmp_path / "e") == 0
    assert build(toys["toy"], "openvino", tmp_path / "e") == 2  # exists: --overwrite to replace
    assert "already exists" in capsys.readouterr().err


def test_threads_reach_a_cpu_engine(built):
    with Detector(built["toy", "onnxruntime"], threads=1) as d:
        assert d.engines.detector.opts.intra_op_threads == 1
    with Detector(built["toy", "openvino"], threads=1) as d:
        assert d.engines.detector.opts.threads == 1


def test_report_names_the_engine_backend(built):
    from benchmarks.report import check_packages

    (rec,) = check_packages([str(built["toy", "openvino"])], {})
    assert rec["status"] == "ok" and rec["note"] == "openvino engine folder (verified on loading)"
