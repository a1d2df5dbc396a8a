import os
import re

import pytest
import torch
from torch.nn import functional as F

from conftest import error_of, FIXTURES, HELLASWAG_20 as EXAMPLES, parse_args, run, SMALL
import eval_hellaswag
import hellaswag
import train_gpt2
from machinery.world import World
from tokenizer import gpt2_encoding
from train_gpt2 import evaluate_hellaswag, GPT, GPTConfig

HELLASWAG_64 = os.path.join(FIXTURES, "hellaswag_val_64.jsonl")  # rows of 17 to 123 tokens, 34 to 302 packed


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=256, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)).eval()


def test_render_example_packs_the_context_once_then_the_four_endings():
    enc = gpt2_encoding()
    ex = next(hellaswag.iterate_examples(EXAMPLES))
    tokens, positions, segments = hellaswag.render_example(ex, enc)
    ctx = enc.encode(ex["ctx"])
    ends = [enc.encode(" " + e) for e in ex["endings"]]  # the leading space belongs to the ending
    assert ex["label"] == 3 and len(ctx) == 9 and [len(e) for e in ends] == [11, 6, 8, 9]
    assert tokens == ctx + ends[0] + ends[1] + ends[2] + ends[3]
    # every ending's positions continue the context's, as if it were alone after it
    assert positions == list(range(9)) + list(range(9, 20)) + list(range(9, 15)) + list(range(9, 17)) + list(range(9, 18))
    assert segments == [-1] * 9 + [0] * 11 + [1] * 6 + [2] * 8 + [3] * 9


def whole(ex):
    enc = gpt2_encoding()
    return enc.encode(ex["ctx"]), [enc.encode(" " + e) for e in ex["endings"]]


def reference_predictions(model, examples, render=whole):
    """The straightforward scorer: one example at a time, fp32, the full logits, the ending's tokens' losses."""
    preds = []
    for ex in examples:
        ctx, ends = render(ex)
        sums, means = [], []
        for end in ends:
            tokens = torch.tensor([ctx + end])
            with torch.no_grad():
                logits = model(tokens)[0][0]
            # token t of the ending is predicted at position len(ctx) + t - 1
            losses = [F.cross_entropy(logits[len(ctx) + t - 1], torch.tensor(end[t])).item() for t in range(len(end))]
            sums.append(sum(losses))
            means.append(sum(losses) / len(losses))
        preds.append((sums.index(min(sums)), means.index(min(means))))
    return preds


class Recorder:
    """Wraps a model: hellaswag.predict calls hidden() and lm_head, and this notes their input shapes."""
    def __init__(self, model):
        self.model, self.config, self.hidden_shapes, self.head_rows = model, model.config, [], 0

    def hidden(self, idx, pos, mask):
        self.hidden_shapes.append(tuple(idx.shape))
        return self.model.hidden(idx, pos, mask)

    def lm_head(self, h):
        self.head_rows += h.size(0)
        return self.model.lm_head(h)


def test_the_fast_scorer_predicts_what_the_per_example_fp32_scorer_predicts():
    examples = list(hellaswag.iterate_examples(HELLASWAG_64))  # 16 of the shortest, 16 of the longest, 32 others
    model = tiny_model()
    expected = reference_predictions(model, examples)
    assert len(set(expected)) > 4  # the tiny model's predictions vary: a scorer that always says 0 would fail
    enc = gpt2_encoding()
    ending_tokens = sum(len(enc.encode(" " + e)) for ex in examples for e in ex["endings"])
    for budget in (hellaswag.BATCH_TOKENS, 300, 1):  # one batch of many rows, several, one row per batch
        recorder = Recorder(model)
        assert hellaswag.predict(recorder, examples, "cpu", budget) == expected, budget
        # never padded beyond the budget (a row longer than the budget goes alone, padded to its bucket only)
        assert all(B * T <= budget or B == 1 for B, T in recorder.hidden_shapes), recorder.hidden_shapes
        assert sum(B for B, _ in recorder.hidden_shapes) >= 64  # each example is one row, and padding rows
        assert recorder.head_rows == ending_tokens  # the output layer runs at the endings' tokens only
    c, cn, n = hellaswag.evaluate(model, examples, "cpu")
    assert n == 64 and c == sum(p == ex["label"] for (p, _), ex in zip(expected, examples))
    assert cn == sum(pn == ex["label"] for (_, pn), ex in zip(expected, examples))


def test_examples_of_very_different_lengths_share_batches_and_keep_their_predictions():
    long_ctx = " ".join(["The old man walked slowly along the river and looked at the boats."] * 12)
    examples = [  # a context of 168 tokens with one-word endings, a one-word context with long endings, and two of the 64
        {"ctx": long_ctx, "endings": ["Then", "He", "Boats", "Rain"], "label": 1},
        {"ctx": "She", "endings": [long_ctx[:150], long_ctx[:120], "smiled.", long_ctx[20:200]], "label": 2},
    ] + list(hellaswag.iterate_examples(HELLASWAG_64, limit=2))
    model = tiny_model(seed=1)
    expected = reference_predictions(model, examples)
    for budget in (hellaswag.BATCH_TOKENS, 200):
        assert hellaswag.predict(model, examples, "cpu", budget) == expected
    assert hellaswag.predict(model, [], "cpu") == []  # a rank's share of the last round may be empty


def test_a_pass_meets_a_few_shapes_lengths_rounded_to_32_and_row_counts_to_powers_of_two_with_the_same_predictions():
    examples = list(hellaswag.iterate_examples(os.path.join(FIXTURES, "hellaswag_val_every50.jsonl")))  # 201 examples
    model = tiny_model()
    recorder = Recorder(model)
    # rows of 34 to 240-odd tokens: unbucketed, 35 batches of 1,024 tokens met 34 shapes (the val set's 10,042
    # examples, in the loop's rounds, 223); bucketed, these meet 7 (the val set, 13)
    assert hellaswag.predict(recorder, examples, "cpu", budget=1024) == reference_predictions(model, examples)
    shapes = set(recorder.hidden_shapes)
    assert len(shapes) == 7 and len(recorder.hidden_shapes) == 38, sorted(shapes)
    for B, T in shapes:
        assert T % 32 == 0 and (B & (B - 1) == 0 or B == 1024 // T), (B, T)
    assert sum(B * T for B, T in recorder.hidden_shapes) <= 38 * 1024


def test_a_model_with_a_short_context_sees_the_end_of_the_context_as_generate_would():
    enc = gpt2_encoding()
    ex = next(hellaswag.iterate_examples(EXAMPLES))  # a context of 9 tokens, endings of 11, 6, 8 and 9
    ctx = enc.encode(ex["ctx"])
    tokens, positions, segments = hellaswag.render_example(ex, enc, block_size=16)
    # the longest ending (11) fits after the context's last 5 tokens: positions 0..15
    assert tokens[:5] == ctx[-5:] and segments == [-1] * 5 + [0] * 11 + [1] * 6 + [2] * 8 + [3] * 9
    assert max(positions) == 15 and positions[5:16] == list(range(5, 16))
    tokens, positions, segments = hellaswag.render_example(ex, enc, block_size=8)
    assert tokens[:1] == ctx[-1:] and segments == [-1] + [0] * 7 + [1] * 6 + [2] * 7 + [3] * 7  # endings cut to 7
    # scored on what is left, the same as the plain scorer on the rows cropped that way
    examples = list(hellaswag.iterate_examples(EXAMPLES))
    model = GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=1, n_embd=8)).eval()
    def cropped(ex):
        ends = [enc.encode(" " + e)[:15] for e in ex["endings"]]
        return enc.encode(ex["ctx"])[-(16 - max(map(len, ends))):], ends
    expected = reference_predictions(model, examples, render=cropped)
    assert hellaswag.predict(model, examples, "cpu") == expected and len(set(expected)) > 2


def test_the_loop_scores_the_examples_shortest_first_so_its_rounds_pad_little():
    enc = gpt2_encoding()
    examples = list(hellaswag.iterate_examples(HELLASWAG_64))
    loaded = hellaswag.load_for_run(parse_args(["--hellaswag_file", HELLASWAG_64]), World())
    lengths = [len(hellaswag.render_example(example, enc)[0]) for example in loaded]
    assert lengths == sorted(lengths) and (lengths[0], lengths[-1]) == (34, 302)
    assert sorted(e["ctx"] for e in loaded) == sorted(e["ctx"] for e in examples)  # each example, once
    # the order changes nothing: the loop's acc_norm is the one hellaswag.py's scorer gives the file
    model = tiny_model()
    assert evaluate_hellaswag(model, loaded, World()) == hellaswag.evaluate(model, examples, "cpu")[1] / 64


def test_batches_hold_rows_of_similar_length_within_the_token_budget():
    lengths = [5, 90, 7, 40, 41, 6, 88, 200, 39]
    batches = list(hellaswag.token_batches(lengths, 100))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # every row, once
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) * longest <= 100 or len(b) == 1  # padded to its longest row, within budget
    assert [sorted(lengths[i] for i in b) for b in batches] == [[5, 6, 7], [39, 40], [41], [88], [90], [200]]


def test_cli_scores_a_local_checkpoint_on_a_local_file(hf_checkpoint):
    path = hf_checkpoint(vocab_size=50257, n_embd=16, n_positions=256)
    out = run(["eval_hellaswag.py", "-m", path, "-d", "cpu", "--data_file", EXAMPLES,
                          "--limit", "12"])
    assert out.returncode == 0, out.stderr
    acc, acc_norm, n = re.search(r"acc ([0-9.]+) acc_norm ([0-9.]+) examples (\d+)$", out.stdout.strip()).groups()
    model = GPT.from_pretrained(path).eval()
    c, cn, total = hellaswag.evaluate(model, hellaswag.iterate_examples(EXAMPLES, 12), "cpu")
    assert (int(n), float(acc), float(acc_norm)) == (12, round(c / 12, 4), round(cn / 12, 4))


def test_the_lectures_command_scores_a_local_hf_model_and_agrees_with_eval_hellaswag(hf_checkpoint):
    path = hf_checkpoint(vocab_size=50257, n_embd=16, n_positions=256, seed=3)
    lecture = run(["hellaswag.py", "-m", path, "-d", "cpu", "--data_file", HELLASWAG_64])
    assert lecture.returncode == 0, lecture.stderr
    # as the lecture's hellaswag.py ends: N acc_norm: C/N=0.XXXX
    correct, n, acc_norm = re.fullmatch(r"64 acc_norm: (\d+)/(64)=(0\.\d{4})", lecture.stdout.strip()).groups()
    assert float(acc_norm) == round(int(correct) / 64, 4)
    ours = run(["eval_hellaswag.py", "-m", path, "-d", "cpu", "--data_file", HELLASWAG_64])
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.strip().endswith(f"acc_norm {acc_norm} examples 64")  # the batched scorer: the same number
    model = GPT.from_pretrained(path).eval()
    examples = list(hellaswag.iterate_examples(HELLASWAG_64))
    assert int(correct) == sum(pn == ex["label"] for (_, pn), ex in zip(hellaswag.predict(model, examples, "cpu"), examples))
    assert 5 < int(correct) < 59  # the tiny model's picks vary: a scorer that always says 0 would not get here
    no_gpu = run(["hellaswag.py", "-m", path, "--data_file", HELLASWAG_64])  # the lecture's default device: cuda
    assert no_gpu.returncode == 1 and no_gpu.stderr == \
        "error: device 'cuda' asked for, but this torch sees no CUDA GPU here: use --device cpu\n"


def test_offline_without_a_cache_the_run_says_so_once_and_goes_on(tmp_path):
    env = dict(os.environ, HELLASWAG_CACHE=str(tmp_path / "cache"),
               https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")  # nothing leaves this machine
    out = run(["train_gpt2.py", *SMALL, "--hellaswag", "1", "--max_steps", "3", "--eval_every", "1", "--val_steps", "1",
               "--log_dir", str(tmp_path / "log")], env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("hellaswag: no data (") == 1
    assert "training goes on without it" in out.stdout
    kinds = [line.split()[1] for line in (tmp_path / "log" / "log.txt").read_text().splitlines()]
    assert kinds.count("train") == 3 and kinds.count("val") == 3 and "hella" not in kinds


def test_a_missing_hellaswag_file_is_a_clear_error(tmp_path):
    out = run(["train_gpt2.py", *SMALL, "--hellaswag", "1", "--hellaswag_file", "nope.jsonl", "--log_dir", str(tmp_path)])
    assert out.returncode != 0
    assert out.stderr.strip() == "error: --hellaswag_file 'nope.jsonl' not found (or pass --hellaswag 0)"


GOOD = '{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 1}'


@pytest.mark.parametrize("lines, problem", [
    ([GOOD, '{"ctx": "A man", "endings": ["a", "b", "c"], "label": 0}'], "line 2: 'endings' must be a list of 4 texts, got 3"),
    ([GOOD, '{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 4}'], "line 2: 'label' must be 0, 1, 2 or 3, got 4"),
    ([GOOD, '{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": "1"}'], "line 2: 'label' must be 0, 1, 2 or 3, got '1'"),
    (['{"endings": ["a", "b", "c", "d"], "label": 1}'], "line 1: no 'ctx' text"),
    ([GOOD, "", GOOD], "line 2: a blank line"),
    ([GOOD, '{"ctx": "A man", "endings": ['], "line 2: not a JSON object"),
    (["[1, 2]"], "line 1: not a JSON object"),
    ([], "holds no HellaSwag examples"),
])
def test_rows_that_are_not_hellaswag_examples_are_refused_with_their_line(tmp_path, lines, problem):
    path = tmp_path / "h.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(ValueError) as e:
        list(hellaswag.iterate_examples(str(path)))
    assert str(e.value).startswith(f"{path}") and problem in str(e.value)


def test_a_bad_hellaswag_file_is_a_one_line_error_in_the_scorer_and_in_training(tmp_path):
    bad = tmp_path / "three_endings.jsonl"
    bad.write_text(GOOD + "\n" + GOOD.replace('"c", ', "") + "\n")
    assert error_of(eval_hellaswag.main, ["-m", "nowhere.pt", "--data_file", EXAMPLES, "--limit", "0"]) == \
        "error: --limit must be at least 1, got 0"
    assert error_of(eval_hellaswag.main, ["-m", "nowhere.pt", "--data_file", str(bad)]) == \
        f"error: {bad} line 2: 'endings' must be a list of 4 texts, got 3: each line must be one HellaSwag example"
    error = error_of(train_gpt2.main, [*SMALL, "--hellaswag", "1", "--hellaswag_file", str(bad), "--max_steps", "1",
                                       "--log_dir", str(tmp_path / "log")])
    assert error.startswith(f"error: --hellaswag_file: {bad} line 2: 'endings' must be a list of 4 texts, got 3")
    assert not (tmp_path / "log" / "log.txt").exists()


def test_hellaswag_is_a_leaf_the_trainer_imports_and_its_command_downloads_and_checks_a_split(tmp_path):
    # importing it loads nothing of ours but the tokenizer and the error helpers: the trainer imports it
    out = run(["-c", "import sys, hellaswag; print([m for m in sys.modules if m in "
                     "('train_gpt2', 'eval_hellaswag', 'sample', 'export_hf', 'bench', 'fineweb')])"])
    assert out.stdout == "[]\n", out.stderr
    cache = tmp_path / "cache"
    env = dict(os.environ, HELLASWAG_CACHE=str(cache),
               https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")  # nothing leaves this machine
    out = run(["hellaswag.py"], env=env)  # offline, nothing cached: one line that says what to do, no traceback
    assert out.returncode == 1 and out.stderr.startswith("error: cannot download HellaSwag's val split (") and \
        out.stderr.endswith(f"): on a machine online, run `python hellaswag.py --download_only 1` and copy "
                            f"{cache}/hellaswag_val.jsonl here, or pass --data_file\n"), out.stderr
    assert not list(cache.glob("*"))  # no partial download left behind
    (cache / "hellaswag_val.jsonl").write_text(open(HELLASWAG_64).read())  # as a finished download leaves it
    out = run(["hellaswag.py", "--split", "val", "--download_only", "1"], env=env)
    assert out.returncode == 0 and out.stdout == f"hellaswag val: 64 examples in {cache}/hellaswag_val.jsonl\n"
    (tmp_path / "a_file").write_text("")  # HELLASWAG_CACHE pointing at a file: the setting is named
    out = run(["hellaswag.py", "--download_only", "1"], env={**env, "HELLASWAG_CACHE": str(tmp_path / "a_file")})
    assert (out.returncode, out.stderr) == (1, f"error: HELLASWAG_CACHE={tmp_path / 'a_file'} is a file: set it to a "
                                               "directory, or unset it for ./hellaswag\n")


def test_a_file_with_a_byte_order_mark_reads_and_an_empty_context_is_scored_after_endoftext(tmp_path):
    path = tmp_path / "bom.jsonl"
    with open(EXAMPLES, encoding="utf-8") as f:
        first = f.readline()
    path.write_bytes(b"\xef\xbb\xbf" + first.encode())  # as some Windows editors save UTF-8
    assert list(hellaswag.iterate_examples(str(path))) == list(hellaswag.iterate_examples(EXAMPLES, limit=1))
    example = {"ctx": "", "endings": ["a", "b", "c", "d"], "label": 2}  # no context, endings of one token each
    tokens, positions, segments = hellaswag.render_example(example, gpt2_encoding())
    assert tokens[0] == 50256 and segments == [-1, 0, 1, 2, 3]  # each ending now predicted from <|endoftext|>
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=1, n_head=2, n_embd=16)).eval()
    (acc, acc_norm), = hellaswag.predict(model, [example], "cpu")
    assert acc == acc_norm and acc in range(4)  # one token an ending: the sum and the mean choose alike

