"""The import layering of docs/architecture.md ("Packages and import rules"), checked on the source.

Every module of the seven packages is parsed (ast, nothing imported); every import in it counts,
including the ones inside functions. A first-party import must go to a layer the importing layer
may use (LAYERS), the torch-free layers import no torch-family package, and the entry-point-only
modules (ENTRY_POINTS) are imported by no other package.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "engines", "runtime", "fiber", "train", "compress", "benchmarks")

# layer -> the layers its modules may import (a module belongs to the longest matching layer)
LAYERS = {
    "common": {"common"},
    "engines": {"common", "engines"},
    "runtime": {"common", "engines", "runtime"},
    "fiber.data": {"common", "runtime", "fiber.data"},
    "fiber": {"common", "engines", "runtime", "fiber", "fiber.data"},
    "train": {"common", "runtime", "fiber", "fiber.data", "train"},
    "compress": {"common", "engines", "runtime", "fiber", "fiber.data", "train", "compress"},
    "benchmarks": {"common", "engines", "runtime", "fiber", "fiber.data", "compress", "benchmarks"},
}
TORCH_FREE = ("common", "engines", "runtime", "fiber.data")
TORCH_FAMILY = ("torch", "torchvision", "transformers", "modelopt", "safetensors.torch")
# command-line programs and nothing else: no module outside their own package imports them
ENTRY_POINTS = ("train.coarse", "train.fine", "train.evaluate", "runtime.detect", "runtime.__main__",
                "benchmarks.report")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str, layers=LAYERS) -> str | None:
    best = None
    for layer in layers:
        if (module == layer or module.startswith(layer + ".")) and (best is None or len(layer) > len(best)):
            best = layer
    return best


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``; ``from a import b`` gives both
    ``a`` and ``a.b`` (b may be a module)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names if a.name != "*"]
    return out


def source_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py") if "assets" not in p.parts)


def violations() -> list[str]:
    modules = {module_name(p) for p in source_files()}
    bad = []
    for path in source_files():
        me = module_name(path)
        mine = layer_of(me)
        for line, name in imports_of(path):
            where = f"{path.relative_to(REPO)}:{line}: {me} imports {name}"
            top = name.split(".")[0]
            if mine in TORCH_FREE and any(name == t or name.startswith(t + ".") for t in TORCH_FAMILY):
                bad.append(f"{where} (layer {mine} is torch-free)")
            if top not in PACKAGES:
                continue
            if name not in modules and name.rpartition(".")[0] in modules:
                name = name.rpartition(".")[0]           # from module import name
            target = layer_of(name)
            if target not in LAYERS[mine]:
                bad.append(f"{where} (layer {mine} may import {sorted(LAYERS[mine])}, not {target})")
            for entry in ENTRY_POINTS:
                if name == entry and me.split(".")[0] != entry.split(".")[0]:
                    bad.append(f"{where} (entry point {entry} is imported only by its own package)")
    return bad


def test_imports_follow_the_layering():
    bad = violations()
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad)


def test_torch_free_layers_load_no_torch():
    """Importing every module of common/, engines/, runtime/ (then fiber/data/) in a fresh interpreter
    loads no torch-family package (third-party imports included) and no fiber model code."""
    first = [module_name(p) for p in source_files() if layer_of(module_name(p)) in ("common", "engines", "runtime")
             and module_name(p) != "runtime.__main__"]
    data = [module_name(p) for p in source_files() if layer_of(module_name(p)) == "fiber.data"]
    code = f"""
import importlib, sys
def heavy(*names):
    return sorted(m for m in sys.modules if m.split(".")[0] in names)
for m in {first!r}:
    importlib.import_module(m)
assert not heavy("torch", "torchvision", "transformers", "modelopt", "fiber"), heavy("torch", "fiber")
for m in {data!r}:
    importlib.import_module(m)
assert not heavy("torch", "torchvision", "transformers", "modelopt"), heavy("torch")
assert sorted(m for m in sys.modules if m.startswith("fiber.")) == sorted({data!r}), "fiber model code loaded"
print("clean")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "clean", proc.stderr[-2000:]
    assert len(first) > 20 and len(data) >= 5


def test_the_checker_sees_lazy_relative_and_from_imports(tmp_path, monkeypatch):
    """The checker itself: a function-level import, a relative one and a 'from' import are edges."""
    pkg = tmp_path / "runtime"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text("def f():\n    import torch\n    from fiber import models\n"
                                "from . import ok\nfrom train.fine import main\n")
    (pkg / "ok.py").write_text("import numpy\nfrom common import package\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    got = violations()
    assert any("runtime.bad imports torch" in v and "torch-free" in v for v in got)
    assert any("runtime.bad imports fiber.models" in v for v in got)
    assert any("runtime.bad imports train.fine" in v and "entry point" in v for v in got)
    assert not any(v.startswith("runtime/ok.py") or "imports runtime.ok" in v for v in got)
    assert "runtime.ok" in {module_name(p) for p in source_files()}


def test_every_layer_rule_is_in_the_architecture_doc():
    """docs/architecture.md says exactly what LAYERS and ENTRY_POINTS enforce."""
    doc = (REPO / "docs" / "architecture.md").read_text()
    section = doc.split("## Packages and import rules", 1)[1].split("\n## ", 1)[0]
    rules = re.sub(r"\n  +", " ", section).splitlines()          # one line per bullet
    for layer, allowed in LAYERS.items():
        line = next((ln for ln in rules if ln.startswith(f"- `{layer.replace('.', '/')}/` ")), None)
        assert line is not None, f"docs/architecture.md lists no import rule for {layer}/"
        named = set(re.findall(r"`([a-z_.]+)`", line.split("(never")[0]))
        assert named == allowed - {layer}, f"docs/architecture.md's rule for {layer}/: {line}"
    for entry in ENTRY_POINTS:
        assert f"`{entry}`" in section, f"docs/architecture.md does not list entry point {entry}"
