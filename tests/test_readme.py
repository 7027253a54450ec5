"""The README's commands still work: the demo command runs on the shipped model, every `make`
target it names exists, CI runs the README's test command, and every CLI it names answers --help."""
from __future__ import annotations

import importlib
import json
import os
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


def test_ci_runs_setup_then_the_readme_test_command(tmp_path):
    """.ci/run executed with a `make` that records its arguments: setup, then the README's test."""
    assert re.search(r"^\s+make test$", README, re.M)
    log = tmp_path / "make.log"
    fake = tmp_path / "bin" / "make"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(REPO / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines() == ["setup", "test"]


def test_make_test_runs_pytest_on_the_tests():
    """What `make test` would run (make -n): pytest over tests/ with the project's interpreter."""
    proc = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^(env -u PYTHONDONTWRITEBYTECODE )?\.venv/bin/python -m pytest .*\btests$", proc.stdout,
                     re.M), proc.stdout


CLIS = ["runtime.detect", "engines.build", "train.coarse", "train.fine", "train.evaluate", "compress.distill",
        "compress.quantize", "compress.export", "compress.repack", "benchmarks.report", "fiber.data.synth",
        "fiber.checkpoint"]


@pytest.mark.parametrize("module", CLIS)
def test_every_cli_in_the_readme_answers_help(module, capsys):
    """In-process: ``get_args_parser().parse_args(["--help"])`` prints a usage and exits 0."""
    if f"python -m {module}" not in README and f"{module.split('.')[0]}/" not in README:
        pytest.fail(f"{module} is not mentioned in the README")
    argv = ["convert-official", "--help"] if module == "fiber.checkpoint" else ["--help"]
    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).get_args_parser().parse_args(argv)
    assert done.value.code == 0
    assert capsys.readouterr().out.lower().startswith("usage")


def test_a_cli_answers_help_as_a_program():
    """One subprocess smoke test of ``python -m <cli> --help`` (the in-process test covers the rest):
    runtime.detect, the command a user runs first, which loads no torch (the torch CLIs run as
    programs in their own smoke tests: test_export, test_quantize, test_checkpoint, ...)."""
    proc = subprocess.run([sys.executable, "-m", "runtime.detect", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.lower().startswith("usage"), proc.stderr[-1000:]
