"""Real benchmark copies in ../shared/benchmarks load with official sizes and valid labels."""

import json

import pytest

from gazal.benchmarks import BenchmarkUnavailable, load_benchmark
from gazal.errors import GazalError


@pytest.mark.parametrize("name,size", [("medqa", 1273), ("mmlu_pro", 818), ("pubmedqa", 500)])
def test_official_sizes(benchmarks_dir, name, size):
    items = load_benchmark(name, benchmarks_dir, ["health"])
    assert len(items) == size
    assert len({it.id for it in items}) == size
    for it in items:
        assert it.answer in it.labels
        if name != "pubmedqa":
            assert it.answer in it.options
        else:
            assert it.context and it.options is None


def test_mmlu_pro_categories_and_limit(benchmarks_dir):
    assert len(load_benchmark("mmlu_pro", benchmarks_dir, ["health", "biology", "psychology"])) == 818 + 717 + 798
    assert len(load_benchmark("medqa", benchmarks_dir, limit=5)) == 5


def test_missing_local_copy_is_unavailable_not_a_crash(tmp_path):
    with pytest.raises(BenchmarkUnavailable):
        load_benchmark("medqa", tmp_path)


def test_size_mismatch_and_bad_lines_are_errors(tmp_path):
    row = {"id": "1", "question": "q", "options": {"A": "x", "B": "y"}, "answer": "A"}
    (tmp_path / "medqa_test.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(GazalError, match="official test set has 1273"):
        load_benchmark("medqa", tmp_path)
    (tmp_path / "medqa_test.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "answer": "Q"}) + "\n")
    with pytest.raises(GazalError, match=r"medqa_test.jsonl:2: field 'answer'"):
        load_benchmark("medqa", tmp_path)


def test_offline_hub_is_unavailable_not_a_crash(monkeypatch):
    # conftest sets HF_DATASETS_OFFLINE=1, so the hub path must fail fast and plainly.
    monkeypatch.delenv("GAZAL_BENCHMARKS_DIR", raising=False)
    with pytest.raises(BenchmarkUnavailable, match="hub is unreachable"):
        load_benchmark("pubmedqa", None)


def test_eval_skips_what_it_cannot_load(tmp_path):
    from gazal import evaluate, rundir
    from gazal.recipes import load_recipe

    recipe = load_recipe("demo", ["model.name_or_path=gazal:tiny-qwen3", f"eval.benchmarks_dir={tmp_path}"])
    run_dir = tmp_path / "run"
    rundir.prepare(run_dir, recipe)
    results = evaluate.main(recipe, run_dir)
    for name in ("medqa", "mmlu_pro", "pubmedqa"):
        assert "not found" in results["benchmarks"][name]["skipped"]
    assert rundir.is_done(run_dir, "eval")


def test_medmcqa_extra_and_categories(benchmarks_dir):
    items = load_benchmark("medmcqa", benchmarks_dir)
    assert len(items) == 4183 and all(it.answer in it.options for it in items)
    medqa = load_benchmark("medqa", benchmarks_dir)
    assert {it.category for it in medqa} == {"step1", "step2&3"}


@pytest.mark.parametrize("name,limit", [("pubmedqa", 50), ("medqa", 50), ("mmlu_pro", 37), ("pubmedqa", 7)])
def test_stratified_limit_is_seeded_and_keeps_label_proportions(benchmarks_dir, name, limit):
    from collections import Counter

    from gazal.benchmarks import select

    items = load_benchmark(name, benchmarks_dir)
    chosen = select(items, limit, "stratified", seed=42)
    assert len(chosen) == limit == len({it.id for it in chosen})
    assert [it.id for it in chosen] == [it.id for it in select(items, limit, "stratified", seed=42)]
    assert [it.id for it in chosen] != [it.id for it in select(items, limit, "stratified", seed=43)]
    order = {it.id: i for i, it in enumerate(items)}
    assert [order[it.id] for it in chosen] == sorted(order[it.id] for it in chosen)  # file order kept
    full, got = Counter(it.answer for it in items), Counter(it.answer for it in chosen)
    for label, count in full.items():
        assert abs(got[label] - limit * count / len(items)) < 1, (label, got[label], limit * count / len(items))
    if name == "pubmedqa" and limit == 50:
        first = Counter(it.answer for it in select(items, limit, "first"))
        assert first == Counter({"yes": 50}) and set(got) == {"yes", "no", "maybe"}  # why first-N misleads


def test_limit_larger_than_the_benchmark_takes_everything(benchmarks_dir):
    from gazal.benchmarks import select

    items = load_benchmark("pubmedqa", benchmarks_dir)
    assert select(items, 10_000, "stratified", 1) == items and select(items, None) == items
