"""A small stand-in for the data directory, written in code, for a clone with no ``../shared/data`` beside it.

It has the layout the task specs and corpora expect (``<task>/<split>.jsonl`` rows ``{"text"|"premise",
"hypothesis", "label", "idx"}``, ``<task>/labels.json``, ``corpora/<name>/*.txt``) and rows made up here from short
word lists: every label is balanced and every sentence is built from words that carry its label, so the pipeline
has something to learn, but the rows are nobody's data set. Tests that check a property of the real tasks (row
counts, checksums, published numbers) are marked ``real_data`` and skip, with that reason, when only these
fixtures are available (see conftest.py); ``.ci/run`` sets ``ICLGD_REQUIRE_DATA=1`` so CI never skips them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# (label names, a few words per label) for the single-sentence tasks
_WORDS = {
    "sentiment2": (["negative", "positive"],
                   [["dull", "tedious", "clumsy", "bland", "awful", "lifeless"],
                    ["moving", "sharp", "funny", "lovely", "gripping", "warm"]]),
    "sentiment5": (["very negative", "negative", "neutral", "positive", "very positive"],
                   [["dreadful", "unwatchable"], ["weak", "flat"], ["ordinary", "modest"], ["pleasant", "solid"],
                    ["brilliant", "superb"]]),
    "subj": (["objective", "subjective"],
             [["the town", "a farmer", "the police", "his brother", "the ship", "a letter"],
              ["I think", "frankly", "wonderfully", "sadly", "I loved", "it feels"]]),
    "agnews": (["World", "Sports", "Business", "Sci/Tech"],
               [["minister", "embassy", "treaty"], ["coach", "season", "striker"], ["shares", "profit", "merger"],
                ["software", "chip", "internet"]]),
}
_FILLER = ["the", "film", "story", "a", "is", "and", "with", "its", "cast", "plot", "this", "of"]


def _sentence(rng: random.Random, words: list[str]) -> str:
    parts = rng.sample(_FILLER, 4) + rng.sample(words, min(2, len(words)))
    rng.shuffle(parts)
    return " ".join(parts)


def _rows(rng: random.Random, kind: str, n: int) -> list[dict]:
    _, words = _WORDS[kind]
    return [{"text": _sentence(rng, words[i % len(words)]), "label": i % len(words), "idx": i} for i in range(n)]


def _cb_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        who = rng.choice(["Anna", "the clerk", "my uncle", "the pilot"])
        what = rng.choice(["left early", "was tired", "sold the house", "missed the train"])
        label = i % 3
        hyp = {0: f"{who} {what}", 1: f"{who} never {what.split(' ', 1)[-1]}", 2: f"{who} was happy"}[label]
        rows.append({"premise": f"Yesterday {who} {what}. Nobody was surprised.", "hypothesis": hyp, "label": label,
                     "idx": i})
    return rows


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_fixture_data(root: Path, n_demo: int = 400, n_eval: int = 240) -> Path:
    """Write the stand-in data directory under ``root`` (created) and return it. Deterministic."""
    rng = random.Random(0)
    files = {  # task -> (kind, demo files, eval files)
        "sst2": ("sentiment2", ["glue_train", "train"], ["dev", "test"]),
        "sst5": ("sentiment5", ["train"], ["dev", "test"]),
        "mr": ("sentiment2", ["hf_split/train", "train"], ["hf_split/validation", "test"]),
        "subj": ("subj", ["train"], ["test"]),
        "agnews": ("agnews", ["train"], ["test"]),
    }
    for task, (kind, demo, evals) in files.items():
        (root / task).mkdir(parents=True, exist_ok=True)
        (root / task / "labels.json").write_text(json.dumps(_WORDS[kind][0]))
        for f in demo:
            _write(root / task / f"{f}.jsonl", _rows(rng, kind, n_demo))
        for f in evals:
            _write(root / task / f"{f}.jsonl", _rows(rng, kind, n_eval))
    (root / "cb").mkdir(parents=True, exist_ok=True)
    (root / "cb" / "labels.json").write_text(json.dumps(["entailment", "contradiction", "neutral"]))
    _write(root / "cb" / "train.jsonl", _cb_rows(rng, n_demo))
    _write(root / "cb" / "dev.jsonl", _cb_rows(rng, 60))
    lines = [_sentence(rng, rng.choice(_WORDS["sentiment2"][1])) for _ in range(3000)]
    text = "\n".join(lines) + "\n"
    (root / "corpora" / "tinyshakespeare").mkdir(parents=True, exist_ok=True)
    (root / "corpora" / "tinyshakespeare" / "input.txt").write_text(text)
    for name in ("austen", "kjv"):
        d = root / "corpora" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "train.txt").write_text("\n".join(lines[:2700]) + "\n")
        (d / "valid.txt").write_text("\n".join(lines[2700:2850]) + "\n")
        (d / "test.txt").write_text("\n".join(lines[2850:]) + "\n")
    (root / "README.md").write_text("Stand-in data written by tests/fixture_data.py; not a real data set.\n")
    return root
