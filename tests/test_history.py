"""The README's steps table against the git history and the lecture's chapters."""
import os
import re
import subprocess

import pytest

from conftest import ROOT, read_docs

# the chapters of "Let's reproduce GPT-2 (124M)" (YouTube l8pRSuU81PU), as the video lists them
CHAPTERS = {
    "00:00:00": "intro: Let's reproduce GPT-2 (124M)",
    "00:03:39": "exploring the GPT-2 (124M) OpenAI checkpoint",
    "00:13:47": "SECTION 1: implementing the GPT-2 nn.Module",
    "00:28:08": "loading the huggingface/GPT-2 parameters",
    "00:31:00": "implementing the forward pass to get logits",
    "00:33:31": "sampling init, prefix tokens, tokenization",
    "00:37:02": "sampling loop",
    "00:41:47": "sample, auto-detect the device",
    "00:45:50": "let's train: data batches (B,T) -> logits (B,T,C)",
    "00:52:53": "cross entropy loss",
    "00:56:42": "optimization loop: overfit a single batch",
    "01:02:00": "data loader lite",
    "01:06:14": "parameter sharing wte and lm_head",
    "01:13:47": "model initialization: std 0.02, residual init",
    "01:22:18": "SECTION 2: Let's make it fast. GPUs, mixed precision, 1000ms",
    "01:28:14": "Tensor Cores, timing the code, TF32 precision, 333ms",
    "01:39:38": "float16, gradient scalers, bfloat16, 300ms",
    "01:48:15": "torch.compile, Python overhead, kernel fusion, 130ms",
    "02:00:18": "flash attention, 96ms",
    "02:06:54": "nice/ugly numbers. vocab size 50257 -> 50304, 93ms",
    "02:14:55": "SECTION 3: hyperparameters, AdamW, gradient clipping",
    "02:21:06": "learning rate scheduler: warmup + cosine decay",
    "02:26:21": "batch size schedule, weight decay, FusedAdamW, 90ms",
    "02:34:09": "gradient accumulation",
    "02:46:52": "distributed data parallel (DDP)",
    "03:10:21": "datasets used in GPT-2, GPT-3, FineWeb (EDU)",
    "03:23:10": "validation data split, validation loss, sampling revive",
    "03:28:23": "evaluation: HellaSwag, starting the run",
    "03:43:05": "SECTION 4: results in the morning! GPT-2, GPT-3 repro",
    "03:56:21": "shoutout to llm.c, equivalent but faster code in raw C/CUDA",
    "03:59:39": "summary, phew, build-nanogpt github repo",
}
LECTURE_BUILD = 38  # the first 38 commits build what the lecture builds
LINK = r"\[(\d\d:\d\d:\d\d)\]\(https://www\.youtube\.com/watch\?v=l8pRSuU81PU&t=(\d+)s\)"


def seconds(t):
    h, m, s = map(int, t.split(":"))
    return 3600 * h + 60 * m + s


@pytest.fixture(scope="module")
def tables():
    readme = read_docs("README.md", "lecture.md")  # the steps and themes; the chapters, in docs/lecture.md
    # a step of the lecture's build: number, commit, lecture moment, what it adds (where a | is written \|)
    steps = re.findall(r"^\| (\d+) \| `([0-9a-f]{7})` \| ([^|]+) \| (?:\\\||[^|])+ \|$", readme, re.M)
    # a theme after it: name, the range of its commits in git's notation (after..up to), their count
    themes = re.findall(r"^\| ([^|`]+) \| `([0-9a-f]{7})\.\.([0-9a-f]{7}|HEAD)` \|\s*(\d*)\s*\| [^|]+ \|$", readme, re.M)
    chapters = re.findall(rf"^\| {LINK} \| ([^|]+) \| ([^|]+) \|$", readme, re.M)
    return steps, themes, chapters


def history():
    """Every commit's hash, oldest first."""
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True, text=True)
    if shallow.returncode != 0 or shallow.stdout.strip() != "false":  # an export, or a clone of the last commits
        pytest.skip("the table is checked against the whole history: run the tests in a full git clone")
    out = subprocess.run(["git", "rev-list", "--reverse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_the_lectures_build_has_a_row_a_commit_and_every_later_commit_is_in_one_theme(tables):
    steps, themes, _ = tables
    commits = history()
    # the lecture's build: a row a commit, each naming the commit at its place in the history
    assert [int(n) for n, _, _ in steps] == list(range(1, LECTURE_BUILD + 1))
    for (n, h, _), full in zip(steps, commits):
        assert full.startswith(h), (n, h, full[:7])
    assert steps[-1][1] == "8ac1ff1"  # the README's `git checkout 8ac1ff1` is the build's last commit
    # the themes: ranges that follow each other from the build's end, the newest up to HEAD
    position = {full[:7]: i for i, full in enumerate(commits)}
    start = LECTURE_BUILD - 1
    for name, after, upto, count in themes:
        assert position[after] == start, name  # each theme starts where the previous one ended
        end = len(commits) - 1 if upto == "HEAD" else position[upto]
        assert end > start, name  # a theme holds at least one commit
        assert count == ("" if upto == "HEAD" else str(end - start)), name  # the newest one is still growing
        start = end
    assert themes[-1][2] == "HEAD" and [t[2] for t in themes].count("HEAD") == 1


def test_each_lecture_commit_links_a_real_chapter_and_each_chapter_lists_its_commits(tables):
    steps, _, chapters = tables
    assert [t for t, *_ in chapters] == list(CHAPTERS)  # the whole chapter list, in order
    listed = {}
    for t, s, name, commits in chapters:
        assert int(s) == seconds(t) and name.strip() == CHAPTERS[t], t
        listed[t] = set(re.findall(r"`([0-9a-f]{7})`", commits))
    moments = {}
    for n, h, lecture in steps:
        link = re.match(LINK + r" (.+)$", lecture.strip())
        assert link or lecture.startswith("beyond the lecture: "), n  # every commit of the build is placed
        if link:
            t, s, name = link.groups()
            assert int(s) == seconds(t) and name == CHAPTERS[t], n  # a real chapter, its own time and title
            assert h in listed[t], (n, t)  # and the chapter's row lists the commit
            moments[h] = t
    assert len(moments) >= 30  # most of the build follows the video closely
    every = set().union(*listed.values())
    assert every <= {h for _, h, _ in steps} and set(moments) <= every
