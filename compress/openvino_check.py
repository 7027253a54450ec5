"""Does OpenVINO with static shapes reproduce a package's detector? The verdict a manifest records.

OpenVINO compiles a detector for static input shapes ~1.2-1.3x faster than with dynamic ones, but
2026.4 miscompiles some graphs that way (wrong FPN convolutions in the fiber-tiny-test INT8 detector
with snippets off) or crashes compiling them, so engines use static shapes on a graph only where
``graphs.detector.openvino.static_shapes`` says the check passed. compress.export runs it on INT8
packages (and on FP32 ones with ``--openvino-check``); this command adds it to an existing package:

    python -m compress.openvino_check --package models/fiber-nano

Torch-free: the check compares OpenVINO's outputs with the package's ``reference/detector.npz`` in a
child process (a compiler crash must not take the caller down). The manifest is rewritten
atomically; an INT8 package's ``cpu_backend`` follows the verdict as at export, an FP32 package's
stays ONNX Runtime.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import package as pkg
from engines.options import int8_pairs_saturate

REPO = Path(__file__).resolve().parents[1]
# OpenVINO's int8 kernels vs the plain-ONNX reference of an INT8 detector, relative to 1 + max |ref|:
# a float difference in front of any QuantizeLinear can flip a rounding by one quantisation step,
# which propagates (fiber-nano: 2.2e-2 on centerness; ONNX Runtime's own Q/DQ fusions give 2.3e-2).
OPENVINO_TOL = 5e-2
# The same on an x86 CPU without VNNI (engines.options.int8_pairs_saturate: the int8 kernels add
# uint8 x int8 product pairs in int16 with saturation, ONNX Runtime's as well): measured on an
# AVX2-only EPYC, fiber-nano-int8 9.5e-2 (token_logits; ONNX Runtime 7.0e-2), the tiny test
# package 6.8e-2. 0.2 leaves 2x margin, so that the export's verdict does not depend on the CPU
# it ran on; a broken compile (a wrong output) is still far above it.
OPENVINO_TOL_NO_VNNI = 0.2


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def check_openvino(graph: Path, reference: Path, *, int8: bool,
                   tol: float | None = None) -> dict[str, Any]:
    """graphs.detector.openvino: does OpenVINO with static shapes reproduce ``reference`` (within
    ``tol``: by default OPENVINO_TOL, OPENVINO_TOL_NO_VNNI for an ``int8`` graph on an x86 CPU
    without VNNI; an FP32 graph's float kernels do not saturate)? Run in a child process, since
    OpenVINO 2026.4 can crash compiling some graphs.
    ``static_shapes`` is the verdict; engines use static shapes on this graph only when it is true."""
    saturating = int8 and int8_pairs_saturate()
    if tol is None:
        tol = OPENVINO_TOL_NO_VNNI if saturating else OPENVINO_TOL
    if not openvino_installed():
        return {"static_shapes": False, "checked": "OpenVINO is not installed"}
    code = ("import json, sys; from engines.openvino import check_against_reference as check; "
            "print(json.dumps(check(sys.argv[1], sys.argv[2], cache_dir='', static_shapes=True)))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-c", code, str(graph), str(reference)], capture_output=True,
                       text=True, timeout=900, env=env)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        return {"static_shapes": False, "checked": f"OpenVINO failed on {reference.name} (exit status "
                                                   f"{r.returncode}): {last[:200]}"}
    diffs = json.loads(r.stdout.strip().splitlines()[-1])
    return {"static_shapes": max(diffs.values()) <= tol,
            "max_rel_diff": {k: round(v, 6) for k, v in diffs.items()}, "tolerance": tol,
            "checked": f"{reference.parent.name}/{reference.name}, static shapes"
                       + (", x86 CPU without VNNI (int8 pair sums saturate)" if saturating else "")}


def apply_check(detector: dict[str, Any], check: dict[str, Any], int8: bool) -> None:
    """Record ``check`` in the manifest's ``graphs.detector`` entry; an INT8 package runs on
    OpenVINO by default when it passed (its int8 kernels are the fastest CPU path measured)."""
    detector["openvino"] = check
    if int8:
        detector["cpu_backend"] = "openvino" if check["static_shapes"] else "onnxruntime"


def check_package(package: str | Path, write: bool = True) -> dict[str, Any]:
    """Check ``package``'s detector (its files verified first) and, with ``write``, record the
    verdict in its manifest; the check. PackageError for a package that is not one."""
    package = Path(package)
    manifest = pkg.load_package_manifest(package)
    detector = manifest["graphs"]["detector"]
    reference = package / pkg.reference_file("detector")
    if not reference.is_file():
        raise pkg.PackageError(f"{package}: has no {pkg.reference_file('detector')} to check OpenVINO against")
    int8 = manifest.get("precision") == "int8"
    check = check_openvino(package / detector.get("file", pkg.DETECTOR_GRAPH), reference, int8=int8)
    if write:
        apply_check(detector, check, int8)
        pkg.write_manifest(package, manifest)
    return check


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m compress.openvino_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--package", required=True, help="model package whose manifest gets the verdict")
    p.add_argument("--dry-run", action=argparse.BooleanOptionalAction, default=False,
                   help="print the verdict, do not write the manifest")
    return p


def main(args: argparse.Namespace) -> int:
    if not openvino_installed():
        print("compress.openvino_check: OpenVINO is not installed: pip install 'fiber-edge[openvino]'",
              file=sys.stderr)
        return 2
    try:
        check = check_package(args.package, write=not args.dry_run)
    except (ValueError, OSError) as e:  # PackageError
        print(f"compress.openvino_check: {e}", file=sys.stderr)
        return 2
    verdict = "passes" if check["static_shapes"] else "fails"
    diffs = ", ".join(f"{k} {v:.2g}" for k, v in (check.get("max_rel_diff") or {}).items())
    print(f"{args.package}: OpenVINO with static shapes {verdict} ({check['checked']}"
          + (f"; max relative difference {diffs}, tolerance {check['tolerance']:g}" if diffs else "")
          + (")" if args.dry_run else "); recorded in the manifest"))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
