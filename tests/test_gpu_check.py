"""gpu_check.py, the one command for whoever holds a GPU, rehearsed on the CPU: its parts run and its table is filled."""
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import HELLASWAG_20, ROOT, error_of
import gpu_check


def test_the_rehearsal_runs_the_recipe_and_auto_and_writes_one_table(tmp_path, capsys):
    gpu_check.main(["--rehearse", "1", "--skip", "tests,ladder", "--hellaswag_file", HELLASWAG_20,  # the rest
                    "--out", str(tmp_path)])
    out = capsys.readouterr().out
    table = (tmp_path / "gpu_check.md").read_text()
    assert table in out + "\n" or table.strip() in out  # the table printed is the one written
    rows = {line.split(" | ")[0].lstrip("| "): line.strip("|").split(" | ") for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| what")}
    candidates = ["default: compiled, B=64", "--batch_size 128", "--loss_chunks 8", "--loss_chunks 8 --batch_size 128",
                  "--compile_step 1", "--compile_mode max-autotune-no-cudagraphs"]
    assert list(rows) == [*(f"candidate: {c}" for c in candidates), "candidates to make default",
                          "--batch_size auto, the default recipe", "default recipe, 4 steps",
                          "candidate: --async_host 1 (the trainer, 3 steps)"]
    # each candidate beside the default: its speed ratio and its first losses, those of the same math (fp32, the CPU)
    for c in candidates[1:]:
        note = rows[f"candidate: {c}"][6].strip()
        assert re.match(r"[\d.]+x the default; \d+ s with compiling; losses within \d\.\de[-+]\d\d of its: "
                        r"(10\.\d{4} ){2}10\.\d{4}$", note), note
        assert float(note.split("within ")[1].split(" ")[0]) < 1e-5, (c, note)
    assert rows["candidate: --async_host 1 (the trainer, 3 steps)"][6].strip().endswith(
        "the 1 warmup steps' losses within 0.0e+00 of the recipe's: " + rows["default recipe, 4 steps"][6].split(
            "loss ")[1].split(" ")[0])  # digit for digit: where the host waits changes no number
    recipe = rows["default recipe, 4 steps"]
    assert recipe[1].strip() == "16" and float(recipe[2]) > 0 and "HellaSwag over 20 examples: " in recipe[6]
    assert recipe[6].count(" s") >= 3  # steps 0, 2 and the last evaluate HellaSwag: each pass's seconds
    assert sorted(os.listdir(tmp_path / "shards")) == ["edufineweb_train_000001.npy", "edufineweb_val_000000.npy",
                                                       "fineweb.json"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_without_a_gpu_it_says_to_rehearse_and_a_wrong_part_is_named(tmp_path):
    assert error_of(gpu_check.main, ["--out", str(tmp_path)]) == \
        "error: no CUDA GPU here: this command measures one (--rehearse 1 checks it on the CPU)"
    assert error_of(gpu_check.main, ["--skip", "tests,speed"]) == \
        "error: --skip 'tests,speed': the parts are tests, ladder, candidates, auto, recipe"


PROBE = '''import os
import pytest

@pytest.mark.gpu
def test_gpu_probe():
    print("gpu test sees", repr(os.environ.get("CUDA_VISIBLE_DEVICES")))

def test_cpu_probe():
    print("cpu test sees", repr(os.environ.get("CUDA_VISIBLE_DEVICES")))
'''


@pytest.mark.parametrize("markexpr, seen", [("gpu", {"gpu": "'0'"}), ("not gpu", {"cpu": "''"}),
                                            (None, {"gpu": "''", "cpu": "''"})])
def test_pytest_m_gpu_keeps_the_gpu_visible_and_every_other_run_hides_it(tmp_path, markexpr, seen):
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0", "PYTHONPATH": os.path.join(ROOT, "tests")}
    # this suite's conftest, loaded as a plugin into a pytest of its own, as `CUDA_VISIBLE_DEVICES=0 pytest -m gpu` would
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-p", "conftest",
                           *(["-m", markexpr] if markexpr else []), str(tmp_path / "test_probe.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert dict(re.findall(r"(gpu|cpu) test sees ('[^']*')", done.stdout)) == seen, done.stdout
