"""The README's Python snippets run, and its `python -m fastbn info` sample shows the lines the
command prints.

Each ```python block of README.md runs on its own, in a namespace that holds what the text
around it says the reader has: an input `x`, a module `bn`, buffers and parameters (`rm`,
`rv`, `weight`, `bias`, `eps`), a gradient `dy`, a channels-last `x_nhwc`, a convolution's
`conv_w` and `conv_b`, and, in a temporary directory, the checkpoint files it names.  A block
that needs an optional package (ml_dtypes, torch, mpi4py, threadpoolctl) is skipped without it;
the blocks that start MPI or torch.distributed run in a subprocess of their own.  A block that
fails here fails as written for a reader: fix the README, or give the name it needs above.
"""

import io
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastbn

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def fenced_blocks(language):
    """(line number, text) of every ```language block of the README."""
    with open(README, encoding="utf-8") as f:
        lines = f.read().split("\n")
    blocks, start, tag = [], None, None
    for i, line in enumerate(lines):
        if start is None and line.startswith("```"):
            start, tag = i + 1, line[3:].strip()
        elif start is not None and line.strip() == "```":
            if tag == language:
                blocks.append((start + 1, "\n".join(lines[start:i])))
            start = None
    return blocks


PYTHON_BLOCKS = fenced_blocks("python")


def needs(block):
    """The optional packages a block imports or uses."""
    wanted = []
    for package, pattern in [("ml_dtypes", r"\bml_dtypes\b"), ("mpi4py", r"\bmpi4py\b"),
                             ("torch", r"\btorch\b|\bdist\.|resnet18\.pth|last\.pt"),
                             ("threadpoolctl", r"\bthreadpoolctl\b")]:
        if re.search(pattern, block):
            wanted.append(package)
    return wanted


def reader_namespace(tmp_path):
    """What the README's text gives the reader before a snippet (see the module docstring)."""
    rng = np.random.default_rng(0)
    x = rng.random((4, 64, 7, 7), dtype=np.float32)
    bn = fastbn.BatchNorm2d(64)
    bn(x)
    namespace = {
        "np": np, "fastbn": fastbn, "F": fastbn.functional,
        "x": x, "bn": bn, "dy": rng.standard_normal(x.shape).astype(np.float32),
        "x_nhwc": np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1),
        "conv_w": rng.standard_normal((64, 3, 3, 3)).astype(np.float32),
        "conv_b": rng.standard_normal(64).astype(np.float32),
        "rm": np.zeros(64, np.float32), "rv": np.ones(64, np.float32),
        "running_mean": np.zeros(64, np.float32), "running_var": np.ones(64, np.float32),
        "weight": np.ones(64, np.float32), "bias": np.zeros(64, np.float32), "eps": 1e-5,
    }
    try:
        import ml_dtypes
        namespace["ml_dtypes"] = ml_dtypes
    except ImportError:
        pass
    return namespace


def save_checkpoints(directory):
    """resnet18.pth (a resnet-like state_dict) and last.pt (a training checkpoint), by torch."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(64)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.layer1 = nn.Sequential(Block())

    net = Net()
    torch.save(net.state_dict(), os.path.join(directory, "resnet18.pth"))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    torch.save({"epoch": 3, "model": net.state_dict(), "optimizer": optimizer.state_dict()},
               os.path.join(directory, "last.pt"))


def run_in_subprocess(code, cwd):
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def test_the_readme_has_python_snippets():
    assert len(PYTHON_BLOCKS) >= 6


@pytest.mark.parametrize("line, block", PYTHON_BLOCKS, ids=[f"README.md:{n}" for n, _ in PYTHON_BLOCKS])
def test_readme_snippet_runs(line, block, tmp_path, monkeypatch):
    for package in needs(block):
        pytest.importorskip(package)
    monkeypatch.chdir(tmp_path)
    if "torch" in needs(block) and re.search(r"resnet18\.pth|last\.pt", block):
        save_checkpoints(str(tmp_path))
    if "mpi4py" in needs(block):
        # MPI is started once per process: a process of its own, as `python train.py` would be
        run_in_subprocess(block, tmp_path)
        return
    if re.search(r"\bdist\.", block):
        # a torch.distributed group of one process, as the text's workers would have set up
        setup = textwrap.dedent(f"""
            import numpy as np, torch, torch.distributed as dist
            import fastbn.functional as F
            dist.init_process_group("gloo", init_method="file://{tmp_path}/group", rank=0, world_size=1)
            rng = np.random.default_rng(0)
            x = rng.random((4, 8, 5, 5), dtype=np.float32)
            dy = rng.standard_normal(x.shape).astype(np.float32)
            weight, bias, eps = np.ones(8, np.float32), np.zeros(8, np.float32), 1e-5
        """)
        check = textwrap.dedent("""
            y_ref, m_ref, s_ref = F.batch_norm_forward(x, None, None, weight, bias, training=True)
            np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
            dx_ref = F.batch_norm_backward(dy, x, m_ref, s_ref, weight, training=True)[0]
            np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-6)
            dist.destroy_process_group()
        """)
        run_in_subprocess(setup + block + "\n" + check, tmp_path)
        return
    exec(compile(block, f"README.md:{line}", "exec"), reader_namespace(tmp_path))


def info_sample():
    """The README's sample of `python -m fastbn info` (the untagged block that starts with
    'fastbn:')."""
    samples = [text for _, text in fenced_blocks("") if text.startswith("fastbn:")]
    assert len(samples) == 1
    return samples[0]


def test_readme_info_sample_has_every_line_the_command_prints():
    def labels(text):
        # "label: value" lines; a continuation line is indented past the labels
        return [line.split(":")[0].strip() for line in text.splitlines()
                if line.strip() and not line.startswith(" " * 6)]

    printed = io.StringIO()
    fastbn.show_config(file=printed)
    # every line the command prints (but threadpoolctl's, which depends on what is installed)
    wanted = [label for label in labels(printed.getvalue()) if not label.startswith("threadpoolctl")]
    missing = [label for label in wanted if label not in labels(info_sample())]
    assert not missing, f"the README's info sample lacks {missing}"
