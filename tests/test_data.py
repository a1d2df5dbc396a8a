import numpy as np
import pytest
import torch

from conftest import INPUT, SMALL, TINY, assert_same_log, error_of, read_log, run, torchrun
import sample
import train_gpt2
from machinery.world import World
from tokenizer import gpt2_encoding
from train_gpt2 import DataLoaderLite, evaluate_loss, GPT, GPTConfig, load_text_tokens


def test_input_txt_tokenizes_with_gpt2():
    tokens = load_text_tokens(INPUT)
    assert tokens.dtype == np.uint16
    with open(INPUT, encoding="utf-8") as f:
        text = f.read()
    assert len(text) == 1115394  # the bytes are ASCII: characters == bytes
    assert tokens[:8].tolist() == gpt2_encoding().encode(text[:40])[:8]
    assert len(tokens) == 338025


def test_first_batch_targets_are_inputs_shifted_by_one():
    tokens = torch.from_numpy(load_text_tokens(INPUT).astype(np.int64))
    B, T = 4, 32
    x, y = DataLoaderLite(B, T, data_root=INPUT).next_batch()
    assert x.shape == y.shape == (B, T) and x.dtype == torch.long
    assert torch.equal(x.reshape(-1), tokens[:B * T])
    assert torch.equal(y.reshape(-1), tokens[1:B * T + 1])
    assert torch.equal(y[:, :-1], x[:, 1:])  # within a row
    assert torch.equal(y[:-1, -1], x[1:, 0])  # across rows: the stream continues


def test_a_text_file_splits_90_train_10_val():
    tokens = load_text_tokens(INPUT)
    n = int(0.9 * len(tokens))
    train = DataLoaderLite(2, 8, split="train", data_root=INPUT)
    val = DataLoaderLite(2, 8, split="val", data_root=INPUT)
    assert (train.total, val.total) == (n, len(tokens) - n)
    x, _ = val.next_batch()
    assert x.reshape(-1).tolist() == tokens[n:n + 16].tolist()


def test_untrained_loss_on_real_text_is_about_ln_vocab():
    torch.manual_seed(1337)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=4, n_embd=64))
    x, y = DataLoaderLite(4, 64, data_root=INPUT).next_batch()
    with torch.no_grad():
        _, loss = model(x, y)
    assert 10.5 < loss.item() < 11.2  # -ln(1/50257) = 10.82


@pytest.fixture
def shard_dir(tmp_path):
    """Train shards of 50, 30 and 70 tokens (ids above 32767 too) and one val shard."""
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 65535, size=150).astype(np.uint16)
    np.save(tmp_path / "edufineweb_val_000000.npy", rng.integers(0, 65535, size=40).astype(np.uint16))
    for i, (a, b) in enumerate(((0, 50), (50, 80), (80, 150)), start=1):
        np.save(tmp_path / f"edufineweb_train_{i:06d}.npy", stream[a:b])
    return tmp_path, stream.astype(np.int64)


def chunks(stream, B, T, k):
    """Chunk k of the stream read cyclically: B*T+1 tokens from k*B*T."""
    idx = (k * B * T + np.arange(B * T + 1)) % len(stream)
    return stream[idx]


def test_shards_read_as_one_stream_across_shard_ends_and_around(shard_dir):
    d, stream = shard_dir
    B, T = 2, 7  # 14 tokens a chunk: 150 is no multiple, so chunks straddle shard ends and the wrap
    loader = DataLoaderLite(B, T, split="train", data_root=str(d))
    assert loader.total == 150
    for k in range(40):  # almost 4 passes over the data
        x, y = loader.next_batch()
        buf = chunks(stream, B, T, k)
        assert x.reshape(-1).tolist() == buf[:-1].tolist(), k
        assert y.reshape(-1).tolist() == buf[1:].tolist(), k
    assert max(stream) > 32767  # large ids survived the uint16 -> int64 conversion exactly
    assert all(isinstance(s, np.memmap) for s in loader.shards)  # read from disk, never loaded whole


def test_two_ranks_split_the_one_rank_stream_exactly(shard_dir):
    d, _ = shard_dir
    B, T = 3, 5
    one = DataLoaderLite(B, T, 0, 1, "train", str(d))
    ranks = [DataLoaderLite(B, T, r, 2, "train", str(d)) for r in (0, 1)]
    for step in range(25):
        expected = [one.next_batch()[0] for _ in range(2)]  # chunks 2s and 2s+1
        got = [r.next_batch()[0] for r in ranks]
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), step
        assert not torch.equal(got[0], got[1])


def test_val_split_and_reset(shard_dir):
    d, _ = shard_dir
    val = DataLoaderLite(2, 4, split="val", data_root=str(d))
    first = val.next_batch()[0]
    val.next_batch()
    val.reset()
    assert torch.equal(val.next_batch()[0], first)
    expected = np.load(d / "edufineweb_val_000000.npy")[:8].astype(np.int64)
    assert first.reshape(-1).tolist() == expected.tolist()


def test_missing_or_bad_data_is_a_clear_error(tmp_path, shard_dir):
    with pytest.raises(ValueError, match=r"data '.*nowhere' not found: run `python fineweb.py`"):
        DataLoaderLite(2, 4, data_root=str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no val shards \(\*_val_\*\.npy\) in .*empty: run `python fineweb.py`"):
        DataLoaderLite(2, 4, split="val", data_root=str(empty))
    d, _ = shard_dir
    np.save(d / "edufineweb_train_000002.npy", np.zeros(30, dtype=np.float32))
    with pytest.raises(ValueError, match=r"shard .*edufineweb_train_000002\.npy is not a 1-D uint16 token array"):
        DataLoaderLite(2, 4, data_root=str(d))
    np.save(d / "edufineweb_train_000002.npy", np.zeros((3, 10), dtype=np.uint16))
    with pytest.raises(ValueError, match=r"edufineweb_train_000002\.npy is not a 1-D uint16"):
        DataLoaderLite(2, 4, data_root=str(d))
    with pytest.raises(ValueError, match="fewer than one step"):
        DataLoaderLite(1000, 100, data_root=INPUT, split="val")  # val holds 33,803 tokens


def test_val_loss_is_the_mean_over_the_first_val_steps_chunks(shard_dir):
    d, _ = shard_dir
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=65536, n_layer=1, n_head=1, n_embd=8))
    val = DataLoaderLite(1, 4, split="val", data_root=str(d))
    loss = evaluate_loss(model, val, 3, World())
    val.reset()
    expected = sum(model(*val.next_batch())[1].item() for _ in range(3)) / 3
    assert abs(loss - expected) < 1e-6
    assert abs(evaluate_loss(model, val, 3, World()) - loss) < 1e-7  # from the start each time


@pytest.mark.parametrize("loss_chunks", [1, 2])
def test_the_val_loss_reads_the_same_sequences_whatever_the_micro_batch(loss_chunks):
    # 6 sequences of 8 tokens: in micro-batches of 1, 2, 3 and 6, and of 4 and 5, whose last chunk is cut short
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=50304, n_layer=1, n_head=2, n_embd=16))
    model.loss_chunks = loss_chunks  # --loss_chunks computes the loss in pieces: the cut-short rows must not count
    stream = DataLoaderLite(1, 8, split="val", data_root=INPUT)
    rows = [stream.next_batch() for _ in range(6)]
    expected = sum(model(x, y)[1].item() for x, y in rows) / 6
    for B in (1, 2, 3, 4, 5, 6):
        loss = evaluate_loss(model, DataLoaderLite(B, 8, split="val", data_root=INPUT), 6, World())
        assert abs(loss - expected) < 1e-5, (B, loss, expected)  # float32 sums in another order


def test_b4_b3_and_b2_on_one_or_two_processes_log_the_same_val_loss_and_a_resume_keeps_its_val_batches(tmp_path):
    args = [*TINY, "--total_batch_size", "192", "--max_steps", "1", "--warmup_steps", "1", "--val_steps", "3",
            "--val_batch_size", "4"]
    logs = {}
    for B in (2, 3, 4):
        train_gpt2.main([*args, "--batch_size", str(B), "--log_dir", str(tmp_path / f"b{B}")])
        logs[B] = read_log(tmp_path / f"b{B}")
    out = torchrun(2, [*args, "--batch_size", "3", "--log_dir", str(tmp_path / "two")])
    assert out.returncode == 0, out.stderr
    logs["two"] = read_log(tmp_path / "two")
    vals = {run: [v for _, kind, v in log if kind == "val"] for run, log in logs.items()}
    assert len(set(map(tuple, vals.values()))) == 1 and len(vals[2]) == 1, vals  # 12 sequences, in 6, 4 or 3 chunks
    # a run started with val batches of 2 sequences, resumed at B=4 and told 4: it keeps the val tokens it started with
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    runs = [*TINY, "--total_batch_size", "192", "--max_steps", "4", "--checkpoint_every", "2"]
    train_gpt2.main([*runs, "--log_dir", str(whole)])
    resumed.mkdir()
    (resumed / "log.txt").write_text("".join(l for l in (whole / "log.txt").open() if int(l.split()[0]) <= 1))
    out = run(["train_gpt2.py", *runs, "--batch_size", "4", "--val_batch_size", "4", "--log_dir", str(resumed), "--resume",
               str(whole / "model_00001.pt")])
    assert out.returncode == 0, out.stderr
    assert "validation: 2 batches of 2 sequences, as the run started with (--val_batch_size 2)\n" in out.stdout
    assert_same_log(resumed, whole, tol=2e-6, after=1)  # B=4 trains within rounding of B=2; val on the same tokens


def test_token_ids_beyond_the_models_vocabulary_are_refused_before_training(shard_dir, tmp_path, hf_checkpoint):
    d, stream = shard_dir
    error = error_of(train_gpt2.main, [*SMALL, "--data", str(d), "--batch_size", "1", "--seq_len", "4",
                                       "--total_batch_size", "4", "--log_dir", str(tmp_path / "log")])
    assert error.startswith(f"error: {d} (train) holds token id {stream.max()}, but the model's vocabulary has 50304 ids")
    assert not (tmp_path / "log").exists()
    assert DataLoaderLite(2, 4, split="val", data_root=str(d)).max_id == int(np.load(d / "edufineweb_val_000000.npy").max())
    small = hf_checkpoint(vocab_size=128)  # a model that cannot read GPT-2's tokens
    assert error_of(sample.main, ["-m", small, "-d", "cpu"]).startswith(
        "error: GPT-2 text (--prompt) holds token id 50256, but the model's vocabulary has 128 ids")


def test_a_data_file_that_is_not_text_is_named_in_one_line(tmp_path):
    np.save(tmp_path / "tokens.npy", np.arange(10, dtype=np.uint16))  # a shard passed as a file
    error = error_of(train_gpt2.main, ["--data", str(tmp_path / "tokens.npy"), "--compile", "0", "--log_dir", str(tmp_path / "log")])
    assert error.startswith(f"error: data {tmp_path}/tokens.npy is not UTF-8 text (byte 0x93 at offset 0): pass a text file")
    (tmp_path / "nul.txt").write_bytes(b"abc\x00def")
    with pytest.raises(ValueError, match=r"nul.txt is binary \(it holds NUL bytes\)"):
        load_text_tokens(str(tmp_path / "nul.txt"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match=r"empty.txt is empty: pass a text file"):
        load_text_tokens(str(tmp_path / "empty.txt"))


def epoch_orders(loader, epochs, shards):
    """Which shard each epoch read, in order, from loader's stream (chunks of 10 tokens: 15 an epoch)."""
    stream = np.concatenate([loader.next_batch()[0].reshape(-1).numpy() for _ in range(15 * epochs)])
    orders = []
    for e in range(epochs):
        rest, order = stream[150 * e:150 * (e + 1)], []
        while len(rest):
            i = next(i for i, s in enumerate(shards) if np.array_equal(rest[:len(s)], s))
            order.append(i)
            rest = rest[len(shards[i]):]
        orders.append(order)
    return orders


def test_shuffled_shards_change_order_each_epoch_the_same_on_any_number_of_processes(shard_dir):
    d, stream = shard_dir
    shards = [stream[:50], stream[50:80], stream[80:]]
    assert epoch_orders(DataLoaderLite(2, 5, split="train", data_root=str(d)), 3, shards) == [[0, 1, 2]] * 3
    loader = DataLoaderLite(2, 5, split="train", data_root=str(d), shuffle_seed=1337)
    orders = epoch_orders(loader, 3, shards)
    assert orders == [[0, 1, 2], [0, 2, 1], [1, 0, 2]]  # epoch 0 as listed, then a new order each epoch
    # 2 processes: rank r reads chunks 2s + r, which together are the 1-process stream
    one = DataLoaderLite(2, 5, split="train", data_root=str(d), shuffle_seed=1337)
    ranks = [DataLoaderLite(2, 5, r, 2, "train", str(d), shuffle_seed=1337) for r in (0, 1)]
    for step in range(25):  # past 3 epochs of 150 tokens, 20 a step
        assert [r.next_batch()[1].tolist() for r in ranks] == [one.next_batch()[1].tolist() for _ in range(2)], step
    # a resume mid-epoch continues the same order: 22 chunks in is 7 chunks into epoch 1
    first = DataLoaderLite(2, 5, split="train", data_root=str(d), shuffle_seed=1337)
    for _ in range(22):
        first.next_batch()
    resumed = DataLoaderLite(2, 5, split="train", data_root=str(d), shuffle_seed=1337)
    resumed.load_state_dict(first.state_dict())
    assert first.state_dict() == {"offset": 220}
    for _ in range(30):
        assert torch.equal(resumed.next_batch()[0], first.next_batch()[0])


def test_shuffle_shards_shuffles_the_train_split_only_with_the_runs_seed(tmp_path, monkeypatch):
    for split, n in (("train", 3), ("val", 1)):
        for i in range(n):
            np.save(tmp_path / f"edufineweb_{split}_{i:06d}.npy", np.arange(100, dtype=np.uint16) + i)
    seeds = {}
    class Recording(train_gpt2.DataLoaderLite):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seeds[self.split] = self.shuffle_seed
    monkeypatch.setattr(train_gpt2, "DataLoaderLite", Recording)
    args = [*SMALL, "--data", str(tmp_path), "--max_steps", "1", "--seed", "7", "--val_steps", "3", "--log_dir", str(tmp_path / "log")]
    train_gpt2.main([*args, "--shuffle_shards", "1"])
    assert seeds == {"train": 7, "val": None}
    error = error_of(train_gpt2.main, [*args, "--resume", str(tmp_path / "log" / "model_00000.pt")])
    assert "was made with --shuffle_shards True, not False: resume with the run's own settings" in error
