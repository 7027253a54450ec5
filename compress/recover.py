"""Recover a fine checkpoint from an FP32 model package's ONNX graphs (its training run not kept).

    python -m compress.recover --package models/fiber-nano --out runs/shipped-nano/final [--overwrite]

The exporter keeps most parameters as named initializers, but transposes Linear weights into
anonymous ``onnx::MatMul_*`` constants and folds the Swin relative-position tables (gathered, plus
the shifted-window mask) into ``onnx::Add_*`` constants. To map every stored value back to its
parameter element, the same model is exported twice with each parameter element set to a unique
integer code (exact in float32 below 2**24), once in order and once reversed: a constant element
whose two codes add up to the total is a copy of that parameter element; anything folded with
something else (the mask's -100) breaks the sum and is skipped. The word-embedding table is read
back from text.onnx (per-row int8 or float). Parameters that no graph reads (the unused
``crossattention_t2i.output.LayerNorm`` of fused text layers, token_type row 1) keep their fresh
initialisation and are listed. The result is checked against the package's own reference outputs
(``reference/*.npz``) and refused above ``--tol``.

Only FP32 packages: an INT8 package's detector holds quantised weights.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from common import package as pkg
from compress import onnx_export
from compress.export import example_inputs
from fiber.checkpoint import save_checkpoint
from fiber.config import ModelConfig
from fiber.models import FiberForGrounding

WORDS = "backbone.text.embeddings.word_embeddings.weight"


class RecoverError(ValueError):
    pass


def _export_codes(model: FiberForGrounding, slots: dict, total: int, reverse: bool, x: dict,
                  hidden: np.ndarray, folder: Path) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, (start, n) in slots.items():
            code = torch.arange(start, start + n, dtype=torch.float64)
            params[name].copy_((total - code if reverse else code).view_as(params[name]).float())
    t = onnx_export.to_torch
    onnx_export.export_graph(model.text_graph(), (t(x[pkg.INPUT_IDS]), t(x[pkg.ATTENTION_MASK])),
                             folder / pkg.TEXT_GRAPH, pkg.TEXT_INPUTS, pkg.TEXT_OUTPUTS,
                             onnx_export.TEXT_DYNAMIC_AXES)
    onnx_export.export_graph(model.detector_graph(), (t(x[pkg.IMAGE]), t(hidden), t(x[pkg.ATTENTION_MASK])),
                             folder / pkg.DETECTOR_GRAPH, pkg.DETECTOR_INPUTS, pkg.DETECTOR_OUTPUTS,
                             onnx_export.DETECTOR_DYNAMIC_AXES)


def _shipped_initializers(shipped: onnx.ModelProto, coded: onnx.ModelProto) -> dict:
    """Initializer name in the coded export -> the shipped graph's tensor: by name, or (when the
    exporter merged identical constants, e.g. untrained gates) through the Identity that aliases it or the node that reads it."""
    by_name = {t.name: t for t in shipped.graph.initializer}
    nodes = {n.name: n for n in shipped.graph.node if n.name}
    alias = {n.output[0]: n.input[0] for n in shipped.graph.node
             if n.op_type == "Identity" and n.input[0] in by_name}
    out = {}
    for init in coded.graph.initializer:
        if init.name in by_name or init.name in alias:
            out[init.name] = by_name[alias.get(init.name, init.name)]
            continue
        for node in coded.graph.node:
            if init.name in node.input and node.name in nodes:
                i = list(node.input).index(init.name)
                there = nodes[node.name].input
                if i < len(there) and there[i] in by_name:
                    out[init.name] = by_name[there[i]]
                    break
    return out


def _word_table(text_graph: onnx.ModelProto) -> np.ndarray:
    inits = {t.name: t for t in text_graph.graph.initializer}
    int8 = [k for k in inits if k.endswith(".int8")]
    if int8:
        base = int8[0][:-len(".int8")]
        q = numpy_helper.to_array(inits[int8[0]]).astype(np.int16) - 128
        scale = numpy_helper.to_array(inits[base + ".scale"]).astype(np.float32)
        return q.astype(np.float32) * scale.reshape(-1, 1)
    name = "model." + WORDS
    if name not in inits:
        raise RecoverError("text.onnx has neither an int8 nor a float word-embedding table")
    return numpy_helper.to_array(inits[name]).astype(np.float32)


def package_config(package: Path) -> ModelConfig:
    """The package's model config (its manifest); RecoverError for an INT8 package."""
    manifest = pkg.load_package_manifest(package)
    if manifest.get("precision") != "fp32":
        raise RecoverError(f"{package}: the package is {manifest.get('precision')}; recover from its "
                           f"FP32 twin (an INT8 detector holds quantised weights)")
    return ModelConfig.from_dict(manifest["model"]["config"])


def recover(package: str | Path) -> tuple[dict, list, dict]:
    """-> (state_dict, [(name, elements not found, numel)], parity {output: max |diff|})."""
    package = Path(package)
    cfg = package_config(package)
    name = cfg.name
    torch.manual_seed(0)  # the fresh values of what no graph reads (token_type row 1) are seeded
    model = FiberForGrounding(cfg).eval()
    params = dict(model.named_parameters())
    slots, start = {}, 1
    for pname, p in params.items():
        if pname != WORDS:
            slots[pname] = (start, p.numel())
            start += p.numel()
    total = start
    if total >= 2 ** 24:
        raise RecoverError(f"config '{name}': {total} parameter elements, too many for float32 codes")
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    x = example_inputs(cfg, 16)
    hidden = np.zeros((1, x[pkg.INPUT_IDS].shape[1], cfg.text.hidden_size), np.float32)
    starts = np.array([s for s, _ in slots.values()])
    names = list(slots)
    flat = {n: np.full(slots[n][1], np.nan, np.float64) for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp, "a"), Path(tmp, "b")
        a.mkdir(), b.mkdir()
        _export_codes(model, slots, total, False, x, hidden, a)
        _export_codes(model, slots, total, True, x, hidden, b)
        for graph in (pkg.TEXT_GRAPH, pkg.DETECTOR_GRAPH):
            graph_a = onnx.load(str(a / graph))
            code_a = {t.name: numpy_helper.to_array(t) for t in graph_a.graph.initializer}
            code_b = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(b / graph)).graph.initializer}
            shipped = _shipped_initializers(onnx.load(str(package / graph)), graph_a)
            for init, ca in code_a.items():
                if ca.dtype != np.float32 or ca.size == 0 or init not in shipped or init not in code_b:
                    continue
                ca, cb = ca.astype(np.float64).ravel(), code_b[init].astype(np.float64).ravel()
                ok = (ca == np.rint(ca)) & (ca >= 1) & (ca < total) & (ca + cb == total)
                if not ok.any():
                    continue
                val = numpy_helper.to_array(shipped[init]).astype(np.float64).ravel()
                if val.size != ca.size:
                    raise RecoverError(f"{package}/{graph}: '{init}' has {val.size} values, the "
                                       f"config's export {ca.size}: not a '{name}' package")
                c, v = ca[ok], val[ok]
                which = np.searchsorted(starts, c, side="right") - 1
                for w in np.unique(which):
                    sel = which == w
                    flat[names[w]][(c[sel] - starts[w]).astype(np.int64)] = v[sel]
    state = dict(fresh)
    state[WORDS] = torch.from_numpy(_word_table(onnx.load(str(package / pkg.TEXT_GRAPH))))
    missing = []
    for pname in names:
        v = flat[pname]
        gap = np.isnan(v)
        if gap.any():
            missing.append((pname, int(gap.sum()), v.size))
            v = np.where(gap, fresh[pname].double().numpy().ravel(), v)
        state[pname] = torch.from_numpy(v.astype(np.float32)).view_as(params[pname])
    model.load_state_dict(state)
    return state, missing, parity(model, package)


def parity(model: FiberForGrounding, package: Path) -> dict[str, float]:
    """max |PyTorch - package reference| per output (text_hidden and the detector outputs)."""
    ref_t = np.load(package / pkg.reference_file("text"))
    ref_d = np.load(package / pkg.reference_file("detector"))
    t = torch.from_numpy
    out = {}
    with torch.inference_mode():
        h = model.encode_text(t(ref_t[pkg.INPUT_IDS]), t(ref_t[pkg.ATTENTION_MASK])).numpy()
        out[pkg.TEXT_HIDDEN] = float(np.abs(h - ref_t[pkg.TEXT_HIDDEN]).max())
        det = model.detect(t(ref_d[pkg.IMAGE]), t(ref_d[pkg.TEXT_HIDDEN]), t(ref_d[pkg.ATTENTION_MASK]))
        for oname, o in zip(pkg.DETECTOR_OUTPUTS, det):
            ref = ref_d[oname]
            out[oname] = float(np.abs(o.numpy() - ref).max() / (1.0 + np.abs(ref).max()))
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("compress.recover", description=__doc__.split("\n\n")[0])
    p.add_argument("--package", required=True, type=Path, help="FP32 model package folder")
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="largest accepted relative difference to the package's reference outputs")
    p.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False)
    return p


def main(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.overwrite:
        print(f"compress.recover: --out {args.out}: already exists (pass --overwrite)", file=sys.stderr)
        return 2
    try:
        state, missing, diffs = recover(args.package)
        worst = max(diffs.values())
        if worst > args.tol:
            raise RecoverError(f"recovered weights differ from {args.package}'s reference outputs "
                               f"by {worst:.3g} (> --tol {args.tol}): {diffs}")
        cfg = package_config(args.package)
        save_checkpoint(args.out, state, cfg, overwrite=args.overwrite,
                        extra_meta={"task": "fine", "recovered_from": str(args.package),
                                    "recovery": {"parity": diffs, "not_in_graphs": missing}})
    except (RecoverError, pkg.PackageError, OSError, KeyError, ValueError) as e:
        print(f"compress.recover: error: {e}", file=sys.stderr)
        return 2
    print(f"recovered {args.out} from {args.package}: parity {max(diffs.values()):.2g}; "
          f"{len(missing)} parameter(s) no graph reads kept fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
