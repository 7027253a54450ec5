"""Progress on stderr for long commands, only when stderr is a terminal: the shared
common.progress line, the training loop, evaluation in export/quantize/report (progress_bar) and
compress.calibrate."""
from __future__ import annotations

import io
import sys

import pytest

from common.progress import is_terminal, progress_line


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_line_on_a_terminal_nothing_elsewhere():
    assert progress_line(True, io.StringIO()) is None        # a pipe or a file: nothing
    assert progress_line(False, Tty()) is None               # --no-progress
    tty = Tty()
    bar = progress_line(None, tty, interval=0.0)
    assert list(bar(range(3), desc="eval", unit="image")) == [0, 1, 2]
    text = tty.getvalue()
    assert text.startswith("\reval: 0/3 image [0:00") and "\reval: 3/3 image [0:00" in text
    assert text.endswith("\n") and text.count("\n") == 1
    tty = Tty()
    list(progress_line(True, tty, interval=0.0)(iter("ab"), desc="gen"))  # no len(): no total
    assert "\rgen: 2 it [" in tty.getvalue()
    assert not is_terminal(io.StringIO()) and is_terminal(Tty())


def test_cli_progress_helpers_follow_the_terminal(monkeypatch):
    from benchmarks import latency
    from train import tasks

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert latency.progress_bar(True) is None and tasks.progress_bar(True) is None
    monkeypatch.setattr(sys, "stderr", Tty())
    assert latency.progress_bar(True) is not None and tasks.progress_bar(True) is not None
    assert latency.progress_bar(False) is None and tasks.progress_bar(False) is None


@pytest.mark.parametrize("terminal", [False, True])
def test_training_shows_a_bar_only_on_a_terminal(tmp_path, monkeypatch, terminal):
    from _toy_task import ToyTask, tiny_config
    from train.loop import fit

    err = Tty() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    fit(ToyTask(), tiny_config(max_steps=3, progress=True), tmp_path / "run")
    assert ("3/3" in err.getvalue()) == terminal, err.getvalue()


@pytest.mark.parametrize("terminal", [False, True])
def test_calibration_progress_only_on_a_terminal(tmp_path, monkeypatch, terminal):
    from compress import calibrate as cal
    from fiber.data.synth import SynthConfig, generate
    from toy_package import make_toy_packages

    package = make_toy_packages(tmp_path / "toys")["toy"]
    generate(SynthConfig(images=2, seed=5), tmp_path / "data")
    err = Tty() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    argv = ["--package", str(package), "--data", str(tmp_path / "data"), "--noise", "1", "--threads", "1"]
    assert cal.main(cal.get_args_parser().parse_args(argv)) == 0
    assert ("\rcalibration: 3/3 image" in err.getvalue()) == terminal, err.getvalue()
