"""gpu_check.py, the one command for whoever holds a GPU, rehearsed on the CPU: its parts run and its table is filled."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import HELLASWAG_20, ROOT, error_of
import bench
import gpu_check


def table_rows(table):
    """gpu_check.md's rows: the first cell, and all of them."""
    return {line.split(" | ")[0].lstrip("| "): [c.strip() for c in line.strip("|").split(" | ")]
            for line in table.splitlines() if line.startswith("| ") and not line.startswith("| what")}


def test_the_rehearsal_runs_every_part_in_order_and_a_failure_in_each_is_a_row_the_rest_survive(tmp_path, capsys,
                                                                                                  monkeypatch):
    # a failure injected into each part: the GPU tests, a candidate, --batch_size auto, a rung of the ladder
    monkeypatch.setattr(gpu_check, "GPU_TESTS", str(tmp_path / "no_such_tests.py"))
    real_time = bench.time_training
    def time_training(model, B, T, device, **setting):
        if setting.get("compile_step") or setting.get("tf32") is False:
            raise RuntimeError("injected\nsecond line")
        return real_time(model, B, T, device, **setting)
    monkeypatch.setattr(bench, "time_training", time_training)
    monkeypatch.setattr(gpu_check, "choose_batch_size", lambda *a, **k: torch.empty(1)[5])  # an IndexError
    gpu_check.main(["--rehearse", "1", "--hellaswag_file", HELLASWAG_20, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.strip() in out  # the table printed is the one written
    rows = table_rows(table)
    candidates = ["default: compiled, B=64", "--batch_size 128", "--loss_chunks 8", "--loss_chunks 8 --batch_size 128",
                  "--compile_step 1", "--compile_mode max-autotune-no-cudagraphs",
                  "async_host: pinned, non-blocking copies from the host", "default again, for the noise"]
    ladder = [rung[0] for rung in gpu_check.LADDER]
    # in order of value: tests, the recipe, the candidates, auto, the ladder
    assert list(rows) == ["GPU tests (tests/test_gpu.py)", "default recipe, 4 steps",
                          *(f"candidate: {c}" for c in candidates), "candidates to make default", "--batch_size auto",
                          *(f"ladder: {r}" for r in ladder)]
    assert rows["GPU tests (tests/test_gpu.py)"][6] == "failed: no tests ran in 0.00s"  # pytest's exit 4, its last line
    assert "ERROR: file or directory not found" in (tmp_path / "tests_stdout.txt").read_text()
    assert rows["candidate: --compile_step 1"][6] == "failed: RuntimeError: injected"  # one line
    assert rows["ladder: fp32, TF32 off, eager"][6] == "failed: RuntimeError: injected"
    assert rows["--batch_size auto"][6].startswith("failed: IndexError: index 5 is out of bounds")
    # each candidate that ran beside the default: its speed ratio and its first losses, those of the same math
    for c in candidates[1:]:
        if c != "--compile_step 1":
            note = rows[f"candidate: {c}"][6]
            against = "the trainer's copies" if c.startswith("async_host") else "the default"
            assert re.match(rf"[\d.]+x {against}; \d+ s with compiling; losses within \d\.\de[-+]\d\d of those of "
                            rf"{against}: (10\.\d{{4}} ){{2}}10\.\d{{4}}$", note), note
            assert float(note.split("within ")[1].split(" ")[0]) < 1e-5, (c, note)
    assert re.fullmatch(r".* \(faster than the default's better time by more than \d+\.\d%; its two times differ by "
                        r"\d+\.\d%\)", rows["candidates to make default"][6])
    assert "losses within 0.0e+00 of those of the trainer's copies" in rows[f"candidate: {candidates[6]}"][6]  # exactly
    recipe = rows["default recipe, 4 steps"]
    assert recipe[1] == "16" and float(recipe[2]) > 0 and "HellaSwag over 20 examples: " in recipe[6]
    assert recipe[6].count(" s") >= 3  # steps 0, 2 and the last evaluate HellaSwag: each pass's seconds
    assert len(re.findall(r"^step +\d+ \|", (tmp_path / "recipe_stdout.txt").read_text(), re.M)) == 4
    assert [r[0] for r in rows.values() if r[0].startswith("ladder:") and r[2]] == [f"ladder: {r}" for r in ladder[1:]]
    assert sorted(os.listdir(tmp_path / "shards")) == ["edufineweb_train_000001.npy", "edufineweb_val_000000.npy",
                                                       "fineweb.json"]


def test_a_failed_recipe_is_a_row_and_minutes_skips_what_would_end_past_the_budget_saying_so(tmp_path, monkeypatch,
                                                                                               capsys):
    fails = [sys.executable, "-c", "import sys; print('step 0 never'); sys.exit('error: the recipe broke')"]
    monkeypatch.setattr(gpu_check, "recipe_command", lambda *a: (fails, 64))
    gpu_check.main(["--rehearse", "1", "--skip", "tests,candidates,auto,ladder", "--out", str(tmp_path / "a")])
    rows = table_rows((tmp_path / "a" / "gpu_check.md").read_text())
    assert list(rows) == ["default recipe"]
    assert rows["default recipe"][6] == "failed: RuntimeError: exit 1: error: the recipe broke"
    assert (tmp_path / "a" / "recipe_stdout.txt").read_text() == "step 0 never\n"  # what it printed, kept
    # 3 seconds: nothing fits; each part says what it would have taken
    gpu_check.main(["--rehearse", "1", "--minutes", "0.05", "--out", str(tmp_path / "b")])
    rows = table_rows((tmp_path / "b" / "gpu_check.md").read_text())
    assert rows["GPU tests (tests/test_gpu.py)"][6] == "skipped: estimated 300 s, 3 s of --minutes 0.05 left"
    assert [r[6].split(",")[0] for r in rows.values()] == [f"skipped: estimated {s} s" for s in (300, 120, 40, 45, 45, 50,
                                                                                                  60, 330, 80, 40, 60, 120)]
    capsys.readouterr()


def test_a_killed_rehearsal_leaves_every_row_it_finished_and_the_recipes_lines_so_far(tmp_path):
    out = tmp_path / "out"
    check = subprocess.Popen([sys.executable, os.path.join(ROOT, "gpu_check.py"), "--rehearse", "1", "--skip",
                              "candidates,auto,ladder", "--hellaswag_file", HELLASWAG_20, "--out", str(out)],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not re.search(r"^step +1 \|", (out / "recipe_stdout.txt").read_text() if
                            (out / "recipe_stdout.txt").exists() else "", re.M):  # the recipe is under way
            assert time.time() < deadline and check.poll() is None
            time.sleep(0.2)
    finally:
        os.killpg(check.pid, signal.SIGKILL)  # the check and the trainer it started, at once, as a lease ends
    printed = check.communicate()[0]
    rows = table_rows((out / "gpu_check.md").read_text())
    assert list(rows) == ["GPU tests (tests/test_gpu.py)"] and "GPU tests (tests/test_gpu.py) |" in printed
    assert re.fullmatch(r"\d+ skipped in [\d.]+s", rows["GPU tests (tests/test_gpu.py)"][6])  # no GPU here: all skip
    assert re.search(r"^step +0 \|.*\n^step +1 \|", (out / "recipe_stdout.txt").read_text(), re.M)


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
