import os
import re

from conftest import ROOT, run


def test_bench_prints_throughput_mfu_and_memory():
    out = run(["bench.py", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
                          "--batch_size", "2", "--seq_len", "32", "--device", "cpu", "--compile", "0",
                          "--steps", "3", "--warmup", "1"])
    assert out.returncode == 0, out.stderr
    assert re.search(r"^machine: .+\| torch 2", out.stdout, re.M)
    assert "setting: B=2 T=32 device=cpu compile=0 bf16=0" in out.stdout  # --bf16 auto: off on a CPU
    ms, tok_s = re.search(r"step: ([0-9.]+) ms \(median of 3\) \| ([0-9,]+) tok/s", out.stdout).groups()
    assert abs(float(tok_s.replace(",", "")) - 64 / (float(ms) / 1000)) < 0.01 * float(tok_s.replace(",", "")) + 1
    mfu, peak = re.search(r"MFU: ([0-9.]+)% of the measured matmul peak ([0-9.]+) TFLOP/s", out.stdout).groups()
    assert 0 < float(mfu) < 100 and float(peak) > 0
    assert re.search(r"peak memory: [0-9.]+ GiB", out.stdout)


def test_readme_documents_the_benchmark_with_its_machine():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    perf = readme[readme.index("## Performance"):]
    assert "python bench.py" in perf
    rows = [[c.strip() for c in l.strip("|").split("|")] for l in perf.splitlines() if re.match(r"\| 20\d\d-", l)]
    assert rows
    for date, machine, command, step, tok_s, mfu, memory in rows:  # exactly the table's 7 columns
        assert re.fullmatch(r"20\d\d-\d\d-\d\d", date)
        assert machine == "same" or re.search(r"torch \d+\.\d+", machine)  # the machine and its torch
        assert command == "same" or command.startswith("`--") or command.startswith("same with `--")
        assert re.fullmatch(r"[\d,.]+ ms", step) and re.fullmatch(r"[\d,]+", tok_s)
        assert re.match(r"[\d.]+% of", mfu) and re.search(r"[\d.]+ GiB", memory)
