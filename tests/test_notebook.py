import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT, make_hf_checkpoint



def run_notebook(**env):
    """Execute play.ipynb headless from the repo root; return its cells with their outputs."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        nb = nbformat.read(os.path.join(ROOT, "play.ipynb"), as_version=4)
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": ROOT}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return nb.cells


def text_of(cell):
    return "".join(o.get("text", "") for o in cell.get("outputs", []))


@pytest.fixture(scope="module")
def notebook(tmp_path_factory):
    """The notebook executed once against a tiny random checkpoint: (cells, all text output)."""
    d = tmp_path_factory.mktemp("nb")
    path = make_hf_checkpoint(d / "tiny", vocab_size=50257, n_embd=20, n_positions=48)
    log = d / "log.txt"  # a small run's log, as train_gpt2.py writes it
    log.write_text("0 val 10.9500\n0 hella 0.2450\n0 train 10.950000\n1 train 9.800000\n2 train 8.100000\n"
                   "3 train 7.250000\n4 val 7.0100\n4 hella 0.2600\n4 train 6.900000\n")
    cells = run_notebook(NANOGPT_MODEL=path, NANOGPT_LOG=str(log))
    return cells, "\n".join(text_of(c) for c in cells)


def test_notebook_runs_on_a_tiny_local_checkpoint(notebook):
    cells, out = notebook
    assert "transformer.wpe.weight torch.Size([48, 20])" in out
    assert "transformer.h.1.attn.c_attn.weight torch.Size([20, 60])" in out  # Conv1D: (in, out)
    assert "[15496, 11, 314, 1101, 257, 3303, 2746, 11]" in out
    samples = [l for l in out.splitlines() if l.startswith("> Hello, I'm a language model,")]
    assert len(samples) == 5
    images = [o for c in cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the wpe image and its columns


def test_notebook_warm_up_bigram_and_averaging(notebook):
    _, out = notebook
    loss = float(re.search(r"65 characters; bigram val loss ([0-9.]+) nats per character", out).group(1))
    assert 2.4 < loss < 2.6  # a bigram on tiny Shakespeare: about 2.5 nats per character
    assert "loop == matmul: True" in out
    assert "loop == masked softmax: True" in out


def test_notebook_gradient_accumulation_cell(notebook):
    _, out = notebook
    assert "accumulated / 4 == one pass: True" in out
    assert "plain sum / one pass: 4.0" in out


def test_notebook_plots_a_log_against_the_baselines(notebook):
    cells, out = notebook
    assert "train: 5 points, last 6.9000 at step 4" in out
    assert "val: 2 points, last 7.0100 at step 4" in out
    assert "hella: 2 points, last 0.2600 at step 4" in out
    plot_cell = next(c for c in cells if "plot_curves(streams)" in c.source and c.cell_type == "code")
    assert any("image/png" in o.get("data", {}) for o in plot_cell.outputs)  # the figure was drawn
