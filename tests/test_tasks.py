import json

import pytest

from iclgd.core.errors import IclgdError
from iclgd.core.tasks import TASKS, load_task, load_task_spec, resolve_task, sample_demos

ROW = {"text": "a gripping film", "label": 1}
CB_ROW = {"premise": "It rained.", "hypothesis": "The ground is wet", "label": 0}


@pytest.mark.parametrize("task,row,expected_input,expected_demo", [
    ("sst2", ROW, "Sentence: a gripping film Label:", "Sentence: a gripping film Label: Positive"),
    ("sst5", ROW, "Sentence: a gripping film Label:", "Sentence: a gripping film Label: bad"),
    ("mr", ROW, "Review: a gripping film Sentiment:", "Review: a gripping film Sentiment: Positive"),
    ("subj", ROW, "Input: a gripping film Type:", "Input: a gripping film Type: subjective"),
    ("agnews", ROW,
     "Classify the news articles into the categories of World, Sports, Business, and Technology. "
     "Article: a gripping film Answer:",
     "Classify the news articles into the categories of World, Sports, Business, and Technology. "
     "Article: a gripping film Answer: Sports"),
    ("cb", CB_ROW, "It rained. Question: The ground is wet. True, False, or Neither? Answer:",
     "It rained. Question: The ground is wet. True, False, or Neither? Answer: True"),
])
def test_exact_templates(task, row, expected_input, expected_demo):
    spec = TASKS[task]
    assert spec.format_input(row) == expected_input
    assert spec.format_demo(row) == expected_demo


@pytest.mark.real_data  # the real splits' sizes
@pytest.mark.parametrize("task,n_eval,n_labels", [
    ("sst2", 872, 2), ("sst5", 1101, 5), ("mr", 1066, 2), ("subj", 2000, 2), ("agnews", 2000, 4), ("cb", 56, 3),
])
def test_eval_split_sizes(data_dir, task, n_eval, n_labels):
    d = load_task(TASKS[task], data_dir)
    assert len(d.eval_rows) == n_eval
    assert {r["label"] for r in d.eval_rows} <= set(range(n_labels))
    assert len(d.files) == 2 and all(len(h) == 64 for h in d.files.values())


def test_eval_shuffle_is_seed_one_and_n_test_is_a_prefix(data_dir):
    full = load_task(TASKS["cb"], data_dir)
    part = load_task(TASKS["cb"], data_dir, n_test=10)
    assert [r["idx"] for r in part.eval_rows] == [r["idx"] for r in full.eval_rows[:10]]
    assert [r["idx"] for r in full.eval_rows] != sorted(r["idx"] for r in full.eval_rows)


def test_demo_sampling_deterministic_and_balanced(data_dir):
    pool = load_task(TASKS["sst5"], data_dir, n_test=1).demo_pool
    a, b = sample_demos(pool, 8, 3), sample_demos(pool, 8, 3)
    assert [r["idx"] for r in a] == [r["idx"] for r in b]
    assert [r["idx"] for r in a] != [r["idx"] for r in sample_demos(pool, 8, 4)]
    bal = sample_demos(pool, 10, 3, balanced=True, n_labels=5)
    assert sorted(r["label"] for r in bal) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_unknown_task():
    with pytest.raises(IclgdError, match="unknown task"):
        resolve_task("imdb")


def test_k_larger_than_train_split():
    with pytest.raises(IclgdError, match="larger than the demonstration split"):
        sample_demos([ROW] * 3, 4, 1)


def _spec(tmp_path, eval_lines, label_words=("no", "yes")):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(6)))
    (tmp_path / "test.jsonl").write_text(eval_lines)
    spec = {"name": "mine", "template": "Q: {text} A:", "label_words": list(label_words),
            "demo_file": "train.jsonl", "eval_file": "test.jsonl"}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    return load_task_spec(tmp_path / "spec.json")


def test_user_task_from_spec(tmp_path):
    spec = _spec(tmp_path, '{"text": "x", "label": 1}\n{"text": "y", "label": 0}\n')
    d = load_task(spec, None)
    assert spec.format_demo(d.eval_rows[0] | {"label": 1}).endswith("A: yes")
    assert len(d.eval_rows) == 2 and len(d.demo_pool) == 6


def test_malformed_json_line_names_file_and_line(tmp_path):
    spec = _spec(tmp_path, '{"text": "x", "label": 1}\n{"text": "y", "label": \n')
    with pytest.raises(IclgdError, match=r"test\.jsonl:2: malformed JSON line"):
        load_task(spec, None)


def test_label_outside_verbalizer(tmp_path):
    spec = _spec(tmp_path, '{"text": "x", "label": 1}\n{"text": "y", "label": 2}\n')
    with pytest.raises(IclgdError, match=r"test\.jsonl:2: label 2 is outside the verbalizer"):
        load_task(spec, None)


def test_missing_data_file_and_dir(tmp_path):
    with pytest.raises(IclgdError, match="data file not found"):
        load_task(TASKS["sst2"], tmp_path)
    from iclgd.core.tasks import resolve_data_dir

    with pytest.raises(IclgdError, match="directory not found"):
        resolve_data_dir(tmp_path / "nowhere")


def test_balanced_demonstrations_are_shuffled_by_the_seed(data_dir):
    """Still one per class per round, but not in label order: the last demonstration is not always the last label."""
    pool = load_task(TASKS["agnews"], data_dir, n_test=1).demo_pool
    orders = [[r["label"] for r in sample_demos(pool, 8, s, balanced=True, n_labels=4)] for s in range(1, 21)]
    assert all(sorted(o) == [0, 0, 1, 1, 2, 2, 3, 3] for o in orders)
    assert len({o[-1] for o in orders}) == 4  # every label ends some prompt over 20 seeds
    again = [[r["idx"] for r in sample_demos(pool, 8, s, balanced=True, n_labels=4)] for s in (1, 2)]
    assert again[0] == [r["idx"] for r in sample_demos(pool, 8, 1, balanced=True, n_labels=4)]  # deterministic
    assert again[0] != again[1]
