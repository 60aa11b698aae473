"""Data files: seed sets load; bad rows name file, line and field."""

import json

import pytest

from gazal.data import load_grpo_items, load_sft_rows
from gazal.errors import GazalError


def test_seed_sets_load():
    rows = load_sft_rows("seed:sft")
    items = load_grpo_items("seed:grpo")
    assert len(rows) >= 30 and len(items) >= 30
    assert all(it.answer in it.options for it in items)


def _jsonl(tmp_path, rows, raw=None):
    path = tmp_path / "d.jsonl"
    path.write_text(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GOOD_SFT = {"case": "c", "reasoning": "r", "answer": "a"}
GOOD_MCQ = {"question": "q", "options": {"A": "x", "B": "y"}, "answer": "B"}


@pytest.mark.parametrize(
    "loader,raw,expected",
    [
        (load_sft_rows, json.dumps(GOOD_SFT) + "\n{not json\n", ["d.jsonl:2", "malformed JSON"]),
        (load_sft_rows, json.dumps({"case": "c", "answer": "a"}) + "\n", ["d.jsonl:1", "missing field 'reasoning'"]),
        (load_sft_rows, json.dumps({**GOOD_SFT, "answer": 3}) + "\n", ["d.jsonl:1", "'answer' must be a string"]),
        (load_sft_rows, "", ["d.jsonl", "empty"]),
        (load_grpo_items, json.dumps({**GOOD_MCQ, "answer": "C"}) + "\n", ["d.jsonl:1", "'answer'", "not one of the options"]),
        (load_grpo_items, json.dumps({**GOOD_MCQ, "options": {"A": "x", "C": "y"}}) + "\n", ["d.jsonl:1", "consecutive letters"]),
        (load_grpo_items, json.dumps(GOOD_MCQ) + "\n[1]\n", ["d.jsonl:2", "JSON object"]),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, loader, raw, expected):
    with pytest.raises(GazalError) as info:
        loader(_jsonl(tmp_path, None, raw))
    for piece in expected:
        assert piece in str(info.value)


def test_hub_multiple_choice_rows_map_to_gazal_shape():
    from gazal.data import hub_mcq_row, mcq_item

    # TachyHealth/medical_grpo style: options as lines of the question, answer as a letter.
    row = hub_mcq_row({"question": "Which vitamin deficiency causes scurvy?\nA. Vitamin A\nB. Vitamin C\n"
                                   "C. Vitamin D\nD. Vitamin K", "answer": "#### B"})
    item = mcq_item(row, "hub[0]")
    assert item.question == "Which vitamin deficiency causes scurvy?"
    assert item.options == {"A": "Vitamin A", "B": "Vitamin C", "C": "Vitamin D", "D": "Vitamin K"} and item.answer == "B"
    listed = mcq_item(hub_mcq_row({"question": "q", "options": ["x", "y", "z"], "answer": "C."}), "hub[1]")
    assert listed.options == {"A": "x", "B": "y", "C": "z"} and listed.answer == "C"
    with pytest.raises(GazalError, match="hub\\[2\\].*options"):
        mcq_item(hub_mcq_row({"question": "no options here", "answer": "A"}), "hub[2]")


def test_ii_medical_rl_rows_in_their_documented_shape(monkeypatch):
    """Intelligent-Internet/II-Medical-RL's columns (dataset_name, id_in_dataset, question, answer,
    reasoning, options as one string, problem, label); the hub is stood in for by a local Dataset."""
    from datasets import Dataset

    from gazal import data

    rows = [
        {"dataset_name": "medmcqa", "id_in_dataset": 7, "question": "Scurvy is caused by deficiency of?",
         "answer": "Vitamin C", "reasoning": "...", "options": "Answer Choices:\nA. Vitamin A\nB. Vitamin C\nC. Vitamin D",
         "problem": "...", "label": "B"},
        # Options as a Python literal, the label missing: the answer text names the option.
        {"dataset_name": "medqa", "id_in_dataset": 8, "question": "First-line drug for absence seizures?",
         "answer": "Ethosuximide", "reasoning": "...", "options": "{'A': 'Carbamazepine', 'B': 'Ethosuximide'}",
         "problem": "...", "label": ""},
        # An open question: no options, skipped and counted.
        {"dataset_name": "pubmedqa", "id_in_dataset": 9, "question": "Does X cause Y?", "answer": "yes",
         "reasoning": "...", "options": "", "problem": "...", "label": ""},
    ]
    monkeypatch.setattr(data, "_hub_dataset", lambda name, *a, **k: Dataset.from_list(rows))
    items = data.load_grpo_items("Intelligent-Internet/II-Medical-RL")
    assert [(it.id, it.answer, it.options[it.answer]) for it in items] == [
        ("medmcqa-7", "B", "Vitamin C"), ("medqa-8", "B", "Ethosuximide")]
    bad = [{**rows[0], "label": "E", "answer": "Vitamin E"}]
    monkeypatch.setattr(data, "_hub_dataset", lambda name, *a, **k: Dataset.from_list(bad))
    with pytest.raises(GazalError, match=r"II-Medical-RL\[0\]: field 'answer' is 'E'"):
        data.load_grpo_items("Intelligent-Internet/II-Medical-RL")
