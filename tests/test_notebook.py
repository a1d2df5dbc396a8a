import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_notebook(monkeypatch, **env):
    """Execute play.ipynb headless from the repo root; return its cells with their outputs."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(os.path.join(ROOT, "play.ipynb"), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": ROOT}}).execute()
    return nb.cells


def text_of(cell):
    return "".join(o.get("text", "") for o in cell.get("outputs", []))


def test_notebook_runs_on_a_tiny_local_checkpoint(monkeypatch, hf_checkpoint):
    path = hf_checkpoint(vocab_size=50257, n_embd=20, n_positions=48)
    cells = run_notebook(monkeypatch, NANOGPT_MODEL=path)
    out = "\n".join(text_of(c) for c in cells)
    assert "transformer.wpe.weight torch.Size([48, 20])" in out
    assert "transformer.h.1.attn.c_attn.weight torch.Size([20, 60])" in out  # Conv1D: (in, out)
    assert "[15496, 11, 314, 1101, 257, 3303, 2746, 11]" in out
    samples = [l for l in out.splitlines() if l.startswith("> Hello, I'm a language model,")]
    assert len(samples) == 5
    images = [o for c in cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the wpe image and its columns
