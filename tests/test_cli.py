"""The command line: python -m fastbn ..."""

import subprocess
import sys

import pytest

from fastbn.__main__ import main


def test_demo_checks_the_first_output_by_hand(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    for text in ("input x, shape (1, 2, 3, 4)", "weight (gamma): [1. 1.]", "bias (beta):    [0. 0.]",
                 "output y, shape (1, 2, 3, 4)", "biased variance", "eps = 1e-05",
                 "equal to the hand computation"):
        assert text in out, f"demo output lacks {text!r}:\n{out}"


@pytest.mark.parametrize("seed", [1, 123])
def test_demo_with_other_seeds(seed, capsys):
    assert main(["demo", "--seed", str(seed)]) == 0
    assert "equal to the hand computation" in capsys.readouterr().out


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "fastbn", "demo"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "equal to the hand computation" in result.stdout


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
