"""Replays tests/fuzz/regressions/: every finding of the attacks on the checkpoint reader (the
crafted files of issue #19 and the fuzzers' finds), each refused as EXPECTED.txt says, within
the reader's memory bound, and without changing how the next file loads.

Memory is measured with tracemalloc (numpy reports its allocations to it), not with a clock:
the peak of a read must stay under max_expansion (8) times the file's size plus the 64 MiB
allowance -- the bound the README states; the exponential-time findings are refused by
structure before any work, which the walk's own tests check.
"""

import os
import re
import tracemalloc

import numpy as np
import pytest

from fastbn import CheckpointError, read_checkpoint
from fastbn._readers.arrays import DEFAULT_MAX_EXPANSION, EXPANSION_ALLOWANCE
from fastbn._readers.errors import UnforeseenCheckpointError

HERE = os.path.dirname(os.path.abspath(__file__))
FOLDER = os.path.join(HERE, "fuzz", "regressions")
DATA = os.path.join(HERE, "data")


def _expected():
    expected = {}
    with open(os.path.join(FOLDER, "EXPECTED.txt"), encoding="utf-8") as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                name, pattern = line.rstrip("\n").split("\t")
                expected[name] = pattern
    return expected


EXPECTED = _expected()


def test_every_file_has_an_expectation_and_every_expectation_a_file():
    files = {n for n in os.listdir(FOLDER) if n != "EXPECTED.txt"}
    assert files == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_finding_is_refused_as_expected_within_the_memory_bound(name):
    path = os.path.join(FOLDER, name)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert message.startswith(path + ":") or message.startswith(path + " "), message
    assert not isinstance(info.value, UnforeseenCheckpointError), message
    assert re.search(EXPECTED[name], message[len(path):]), message
    assert peak <= DEFAULT_MAX_EXPANSION * os.path.getsize(path) + EXPANSION_ALLOWANCE, peak


def test_no_finding_changes_how_the_next_file_loads():
    before = read_checkpoint(os.path.join(DATA, "resnet_like.pt"))
    for name in sorted(EXPECTED):
        with pytest.raises(CheckpointError):
            read_checkpoint(os.path.join(FOLDER, name))
    after = read_checkpoint(os.path.join(DATA, "resnet_like.pt"))
    assert before.keys() == after.keys()
    for key, value in before["state_dict"].items():
        np.testing.assert_array_equal(after["state_dict"][key], value)
        assert after["state_dict"][key].dtype == value.dtype
