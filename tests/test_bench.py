import os
import re

import torch

from conftest import HELLASWAG_20, ROOT, error_of, read_docs, run
import bench
from train_gpt2 import GPT, GPTConfig


def test_bench_prints_throughput_mfu_and_memory():
    out = run(["bench.py", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
                          "--batch_size", "2", "--seq_len", "32", "--device", "cpu", "--compile", "0",
                          "--steps", "3", "--warmup", "1"])
    assert out.returncode == 0, out.stderr
    assert f", {torch.get_num_threads()} threads | torch {torch.__version__}\n" in out.stdout  # the machine line
    assert "setting: B=2 T=32 device=cpu compile=0 bf16=0" in out.stdout  # --bf16 auto: off on a CPU
    ms, tok_s = re.search(r"step: ([0-9.]+) ms \(median of 3\) \| ([0-9,]+) tok/s", out.stdout).groups()
    assert abs(float(tok_s.replace(",", "")) - 64 / (float(ms) / 1000)) < 0.01 * float(tok_s.replace(",", "")) + 1
    mfu, peak = re.search(r"MFU: ([0-9.]+)% of the measured matmul peak ([0-9.]+) TFLOP/s", out.stdout).groups()
    assert 0 < float(mfu) < 100 and float(peak) > 0
    memory = float(re.search(r"peak memory: ([0-9.]+) GiB", out.stdout).group(1))
    assert 0.1 < memory < 24  # this process's peak RSS: torch alone takes more than 0.1 GiB, the machine has 24


def test_bench_times_hellaswag_with_the_fast_scorer_and_a_plain_loop_on_one_model():
    out = run(["bench.py", "--hellaswag", HELLASWAG_20, "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--device", "cpu"])
    assert out.returncode == 0, out.stderr
    assert "model: 1,655,264 parameters, 1L 2H 32C, vocab 50304\n" in out.stdout
    assert f"hellaswag: 20 examples of {HELLASWAG_20}, bf16=0\n" in out.stdout
    rows = re.findall(r"^(.+?) +([0-9.]+) s \| +([0-9.]+) examples/s \| ([0-9.]+)x the plain loop$", out.stdout, re.M)
    assert [name for name, *_ in rows] == ["plain loop, an example a pass", "hellaswag.predict"]
    (_, plain, plain_rate, one), (_, fast, fast_rate, speedup) = [[n, *map(float, f)] for n, *f in rows]
    # each figure lies within what the printed rounding of the seconds (to 0.01) allows
    assert one == 1.0 and (plain - 0.005) / (fast + 0.005) - 0.005 <= speedup <= (plain + 0.005) / (fast - 0.005) + 0.005
    for seconds, rate in ((plain, plain_rate), (fast, fast_rate)):
        assert 20 / (seconds + 0.005) - 0.05 <= rate <= 20 / (seconds - 0.005) + 0.05
    assert "same predictions: 20 of 20\n" in out.stdout  # the two scorers agree, example by example
    assert error_of(bench.main, ["--hellaswag", "nope.jsonl"]) == \
        "error: --hellaswag 'nope.jsonl' not found: it takes a HellaSwag jsonl file"
    assert error_of(bench.main, ["--hellaswag", HELLASWAG_20, "--vocab_size", "128", "--device", "cpu"]) == \
        "error: --hellaswag scores GPT-2's tokens: --vocab_size must be at least 50257, got 128"


def test_bench_times_sampling_with_and_without_the_kv_cache(capsys):
    bench.main(["--generate", "24", "--batch_size", "3", "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
                "--device", "cpu"])
    out = capsys.readouterr().out
    assert "sampling: 3 rows x 24 new tokens, top-k 50, bf16=0\n" in out and "same tokens: True\n" in out
    rows = re.findall(r"^(.+?) +([0-9.]+) s \| +([0-9.]+) tokens/s \| ([0-9.]+)x the uncached$", out, re.M)
    assert [name for name, *_ in rows] == ["with the KV cache", "without (the prefix again)"]
    for _, seconds, rate, _ in rows:  # 72 tokens in that many seconds, within what their rounding to 0.01 allows
        assert 72 / (float(seconds) + 0.005) - 0.05 <= float(rate) <= 72 / max(float(seconds) - 0.005, 1e-9) + 0.05
    assert rows[1][3] == "1.00"
    assert error_of(bench.main, ["--generate", "1024", "--device", "cpu"]) == \
        "error: --generate 1024 must be shorter than the context, 1024"


def test_bench_profiles_a_step_into_kinds_of_work_and_its_top_operators(capsys):
    bench.main(["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "2", "--seq_len", "32",
                "--device", "cpu", "--compile", "0", "--steps", "1", "--warmup", "1", "--profile", "1"])
    out = capsys.readouterr().out
    assert re.search(r"^profile: 3 steps, [\d.]+ ms of CPU operator time$", out, re.M)
    shares = dict((k.strip(), float(v)) for k, v in re.findall(r"([a-z ]+?) ([\d.]+)%", out.split("ms of CPU operator time\n")[1]
                                                         .splitlines()[0]))
    assert {"matmul", "loss", "attention"} <= set(shares) and abs(sum(shares.values()) - 100) < 0.5, shares
    top = re.findall(r"^ +([\d.]+)% +([\d.]+) ms +(\d+)x  (\w[\w ]*?) +(aten::\w+|\S.*)$", out, re.M)
    assert len(top) == 12 and [float(t[0]) for t in top] == sorted((float(t[0]) for t in top), reverse=True)
    assert ("matmul", "aten::mm") in {(kind, name) for *_, kind, name in top}  # the matmuls, classified as such
    assert bench.kind_of("triton_per_fused__log_softmax_backward_data_0") == "loss"  # compile's fused kernel names
    assert bench.kind_of("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTT") == "matmul"
    assert bench.kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_bprop") == "attention"


def test_the_performance_guide_documents_the_benchmarks_with_their_machine():
    perf = read_docs("performance.md")
    assert "python bench.py" in perf
    tables, header = {}, None
    for line in perf.splitlines():
        if line.startswith("| date |"):
            header = line
        elif re.match(r"\| 20\d\d-", line):
            tables.setdefault(header, []).append([c.strip() for c in line.strip("|").split("|")])
    training = [rows for h, rows in tables.items() if "| step |" in h]
    hellaswag = [rows for h, rows in tables.items() if "| hellaswag.predict |" in h]
    sampling = [rows for h, rows in tables.items() if "| with the cache |" in h]
    assert len(training) == 1 and len(hellaswag) == 1 and len(sampling) == 1 and len(tables) == 3
    for date, machine, command, cached, uncached, speedup, same in sampling[0]:
        assert re.fullmatch(r"20\d\d-\d\d-\d\d", date) and re.search(r"torch \d+\.\d+", machine)
        assert command.startswith("`python bench.py --generate ") and same == "yes"
        cached, uncached = (float(rate.removesuffix(" tok/s")) for rate in (cached, uncached))
        assert abs(float(speedup.removesuffix("x")) - cached / uncached) <= 0.05 * cached / uncached
    for date, machine, command, step, tok_s, mfu, memory in training[0]:  # exactly the table's 7 columns
        assert re.fullmatch(r"20\d\d-\d\d-\d\d", date)
        assert machine == "same" or re.search(r"torch \d+\.\d+", machine)  # the machine and its torch
        assert command == "same" or command.startswith("`--") or command.startswith("same with `--")
        assert re.fullmatch(r"[\d,.]+ ms", step) and re.fullmatch(r"[\d,]+", tok_s)
        assert re.match(r"[\d.]+% of", mfu) and re.search(r"[\d.]+ GiB", memory)
    for date, machine, command, examples, plain, fast, speedup in hellaswag[0]:
        assert re.fullmatch(r"20\d\d-\d\d-\d\d", date)
        assert machine == "same" or re.search(r"torch \d+\.\d+", machine)
        assert command.startswith("`--hellaswag ") or command.startswith("same with ")
        assert re.fullmatch(r"\d+", examples)
        plain, fast, speedup = float(plain.removesuffix("/s")), float(fast.removesuffix("/s")), float(speedup.removesuffix("x"))
        # the speed-up was printed from unrounded seconds: it agrees with the rates to their rounding
        assert abs(speedup - fast / plain) <= 0.05 * fast / plain


def test_the_candidates_bench_measures_take_the_same_steps_as_the_trainers_step(monkeypatch):
    compiled = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda f, **kw: compiled.append(f.__name__) or real_compile(f, **kw))
    def losses(**setting):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=16, vocab_size=512, n_layer=1, n_head=2, n_embd=32))
        return bench.time_training(model, 2, 16, "cpu", compile=False, bf16=False, steps=3, warmup=1, **setting)[1]
    plain = losses()
    assert len(plain) == 4 and plain[-1] < plain[0]  # it learns the batch
    # compile_step: clipping and AdamW compiled into one graph, once, beside the model (eager here)
    fused_update = losses(compile_step=True)  # the same math, in another order: fp32 rounding apart, not bit for bit
    assert all(abs(a - b) < 1e-5 for a, b in zip(fused_update, plain)) and compiled == ["clip_and_step"]
    # the batches copied from the host as the trainer copies them, or pinned without blocking (on a CPU: plainly)
    host = losses(host="plain")
    assert losses(host="async") == host and host[-1] < host[0]
    x, y = torch.arange(4).view(2, 2), torch.ones(2, 2)
    moved = bench.to_device((x, y), "cpu", pinned=True)  # no pinned memory without an accelerator: a plain copy
    assert all(torch.equal(a, b) and not a.is_pinned() for a, b in zip(moved, (x, y)))
