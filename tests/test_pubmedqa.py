"""PubMedQA's labelled pool as training data: from the shared file or a hub-shaped folder, never the test set."""

import json
from collections import Counter

import pytest

from gazal import pubmedqa
from gazal.cli import main
from gazal.errors import GazalError
from gazal.recipes import load_recipe
from gazal.sft import to_chat

FOLDS = "data.pool_folds={k: 10, sft: [1, 2], grpo: [3, 4, 5], validation: [0]}"


def _recipe(benchmarks_dir, *extra):
    return load_recipe("demo", [f"eval.benchmarks_dir={benchmarks_dir}", *extra])


def test_shared_pool_is_disjoint_from_the_test_set_and_folds_are_stratified(benchmarks_dir):
    recipe = _recipe(benchmarks_dir, "data.sft=pubmedqa:train", "data.grpo=pubmedqa:train", FOLDS)
    items = pubmedqa.load_pool("pubmedqa:train", recipe)
    test = {json.loads(l)["id"] for l in (benchmarks_dir / "pubmedqa_test.jsonl").read_text().splitlines()}
    assert len(items) == 500 and not {it.id for it in items} & test
    assert Counter(it.answer for it in items) == {"yes": 276, "no": 169, "maybe": 55}
    fold = pubmedqa.folds(items, 10, recipe.seed)
    assert Counter(fold.values()) == {f: 50 for f in range(10)}
    for f in range(10):  # each fold holds each label in the pool's proportion, to within one item
        labels = Counter(it.answer for it in items if fold[it.id] == f)
        assert abs(labels["yes"] - 27.6) < 1 and abs(labels["no"] - 16.9) < 1 and abs(labels["maybe"] - 5.5) < 1
    sft = pubmedqa.stage_items("pubmedqa:train", recipe, "sft", items)
    grpo = pubmedqa.grpo_questions(recipe)
    val = pubmedqa.stage_items("pubmedqa:train", recipe, "validation", items)
    assert (len(sft), len(grpo), len(val)) == (100, 150, 50)
    assert not ({it.id for it in sft} & {it.id for it in grpo} or {it.id for it in val} & {it.id for it in sft + grpo})
    assert all(it.options is None and it.context and it.labels == ["yes", "no", "maybe"] for it in grpo)
    # An SFT example is the evaluation prompt with the conclusion inside <think> and the label after it.
    row = pubmedqa.sft_row(sft[0], recipe)
    chat = to_chat(row, None)
    assert chat["prompt"][0]["content"].startswith("Context: ") and "yes, no or maybe" in chat["prompt"][0]["content"]
    assert chat["completion"][0]["content"] == (f"<think>\n{sft[0].extra['long_answer'].strip()}\n</think>\n"
                                                f"The answer is {sft[0].answer}.")
    loaded, validation, checks = pubmedqa.sft_sources(recipe)
    assert len(loaded["pubmedqa:train"]) == 100 and len(validation) == 50
    assert checks["pubmedqa:train"]["shared_ids"] == [] and checks["pubmedqa:train"]["largest_shared_fraction"] < 0.2


def test_hub_shaped_folder_loses_its_test_ids(tmp_path, benchmarks_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    train = [json.loads(l) for l in (benchmarks_dir / "pubmedqa_train.jsonl").read_text().splitlines()[:3]]
    test = json.loads((benchmarks_dir / "pubmedqa_test.jsonl").read_text().splitlines()[0])
    rows = [{"pubid": int(r["id"]), "question": r["question"],
             "context": {"contexts": r["context"].split("\n"), "labels": ["X"] * len(r["context"].split("\n")),
                         "meshes": []},
             "long_answer": r.get("long_answer", "A conclusion."), "final_decision": r["answer"]}
            for r in [*train, {**test, "long_answer": "The test item's conclusion."}]]
    folder = tmp_path / "PubMedQA" / "pqa_labeled"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "train-00000-of-00001.parquet")
    recipe = _recipe(benchmarks_dir)
    items = pubmedqa.load_pool(f"pubmedqa:{tmp_path / 'PubMedQA'}", recipe)
    assert [it.id for it in items] == [r["id"] for r in train]  # the test item is gone
    assert items[0].context == train[0]["context"] and items[0].extra["long_answer"] == train[0]["long_answer"]


def test_a_test_item_in_a_training_file_is_refused_at_validation(tmp_path, benchmarks_dir, capsys):
    lines = (benchmarks_dir / "pubmedqa_train.jsonl").read_text().splitlines()[:2]
    test = json.loads((benchmarks_dir / "pubmedqa_test.jsonl").read_text().splitlines()[4])
    bad = tmp_path / "pool.jsonl"
    bad.write_text("\n".join([*lines, json.dumps({**test, "long_answer": "leaked"})]) + "\n")
    args = ["validate", "--config", "demo", f"eval.benchmarks_dir={benchmarks_dir}", f"data.grpo=pubmedqa:{bad}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3: id {test['id']} is in the PubMedQA test set" in err and "data.grpo" in err
    # The same file without the test item is valid.
    bad.write_text("\n".join(lines) + "\n")
    assert main(args) == 0


def test_pool_folds_must_not_overlap(capsys):
    assert main(["validate", "--config", "demo", "data.pool_folds={k: 10, sft: [1, 2], grpo: [2, 3]}"]) == 2
    assert "folds [2] are in both sft and grpo" in capsys.readouterr().err
    with pytest.raises(GazalError, match="not in 0..4"):
        load_recipe("demo", ["data.pool_folds={k: 5, sft: [7]}"])
