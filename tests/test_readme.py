"""The README's commands still work: the demo command runs on the shipped model, every `make`
target it names exists, and CI runs the README's test command."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
MAKEFILE = (REPO / "Makefile").read_text()


def _indented_blocks(text: str) -> list[str]:
    """Markdown code blocks written as 4-space indented lines (continuations joined)."""
    blocks, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("    ") and line.strip():
            current.append(line.strip())
        elif current:
            blocks.append(" ".join(current).replace("\\ ", ""))
            current = []
    return blocks


def _demo_command() -> list[str]:
    """The `python -m runtime.detect ...` command the README says `make demo` runs."""
    after = README.split("which runs", 1)[1]
    block = next(b for b in _indented_blocks(after) if b.startswith("python -m runtime.detect"))
    return shlex.split(block)


def test_readme_demo_command_is_what_make_demo_runs():
    recipe = MAKEFILE.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    prompt = re.search(r"^DEMO_PROMPT \?= (.+)$", MAKEFILE, re.M).group(1)
    recipe = recipe.replace("$(DEMO_PROMPT)", prompt).replace("$(PY)", "python").replace("\\\n", " ")
    make_cmd = shlex.split(recipe.split("\n", 1)[1])
    assert make_cmd == _demo_command()


def test_readme_demo_runs_on_the_shipped_model(tmp_path):
    cmd = _demo_command()
    out_json, out_dir = tmp_path / "demo.jsonl", tmp_path / "demo"
    cmd[cmd.index("--json") + 1] = str(out_json)
    cmd[cmd.index("--save") + 1] = str(out_dir)
    proc = subprocess.run([sys.executable, *cmd[1:]], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    images = sorted(p.name for p in (REPO / "examples").glob("*.png"))
    records = [json.loads(line) for line in out_json.read_text().splitlines()]
    assert sorted(Path(r["image"]).name for r in records) == images
    assert all("detections" in r and "error" not in r for r in records)
    assert sorted(p.name for p in out_dir.iterdir()) == images


def test_every_make_target_in_the_readme_exists():
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", MAKEFILE, re.M))
    named = set(re.findall(r"\bmake ([a-z][\w-]*)", README))
    assert named and named <= targets, named - targets


def test_ci_runs_the_readme_test_command():
    assert "make test" in README
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
    assert re.search(r"^make setup$", ci, re.M)


@pytest.mark.parametrize("module", ["runtime.detect", "engines.build", "train.coarse", "train.fine",
                                    "train.evaluate", "compress.distill", "compress.quantize",
                                    "compress.export", "compress.repack", "benchmarks.report", "fiber.data.synth",
                                    "fiber.checkpoint"])
def test_every_cli_in_the_readme_answers_help(module):
    if f"python -m {module}" not in README and f"{module.split('.')[0]}/" not in README:
        pytest.fail(f"{module} is not mentioned in the README")
    args = [sys.executable, "-m", module, "--help"]
    if module == "fiber.checkpoint":
        args = [sys.executable, "-m", module, "convert-official", "--help"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage" in proc.stdout.lower(), proc.stderr[-1000:]
