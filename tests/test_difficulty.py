"""The GRPO difficulty filter: a stand-in policy with known pass rates, counts, resume, staleness, processes."""

import json
import threading
from pathlib import Path

import pytest

from gazal import difficulty
from gazal.cli import main
from gazal.config import DifficultyFilterSettings
from gazal.difficulty import filter_items
from gazal.tasks import Item

OPTIONS = {"A": "aspirin", "B": "heparin", "C": "warfarin", "D": "none"}
# id -> right answers of k under the stand-in policy (MCQ answer B, yes/no answer yes).
RIGHT = {"q0": 0, "q1": 4, "q2": 2, "y3": 1, "y4": 4, "q5": 3, "y6": 0, "q7": 2}


def _items() -> list[Item]:
    return [Item(id=i, question=f"Question {i}?", answer="yes") if i.startswith("y")
            else Item(id=i, question=f"Question {i}?", answer="B", options=OPTIONS) for i in RIGHT]


class Policy:
    """A stand-in policy: RIGHT[id] of the k completions give the gold answer, the rest a wrong one.
    Records every call's (ids, seed)."""

    def __init__(self, k: int = 4, fail_after: int | None = None):
        self.calls: list[tuple[list[str], int]] = []
        self.k, self.fail_after = k, fail_after

    def __call__(self, items: list[Item], seed: int) -> list[list[str]]:
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise KeyboardInterrupt("killed")  # as a kill would: mid-estimate, after some calls were written
        self.calls.append(([it.id for it in items], seed))
        out = []
        for it in items:
            wrong = "no" if it.options is None else "D"
            out.append([f"<think>...</think>\nThe answer is {it.answer if j < RIGHT[it.id] else wrong}"
                        for j in range(self.k)])
        return out


def _settings(**kw) -> DifficultyFilterSettings:
    return DifficultyFilterSettings(enabled=True, samples=4, prompts_per_call=3, **kw)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _same(counts: dict) -> dict:
    return {k: v for k, v in counts.items() if k not in ("reused", "sampled", "seconds")}


def test_all_right_and_all_wrong_questions_are_dropped_and_counted(tmp_path):
    path = tmp_path / "grpo" / "pass_rates.jsonl"
    kept, counts = filter_items(_items(), Policy(), _settings(), path, seed=7)
    assert [it.id for it in kept] == ["q2", "y3", "q5", "q7"]  # in the data's order
    assert counts["too_easy"] == 2 and counts["too_hard"] == 2 and counts["kept"] == 4
    assert counts["estimated"] == 8 and counts["not_estimated"] == 0 and counts["sampled"] == 8
    assert counts["by_correct"] == {"0": 2, "1": 1, "2": 2, "3": 1, "4": 2}
    assert counts["mean_pass_rate"] == pytest.approx(sum(RIGHT.values()) / 32)
    rows = {r["id"]: r for r in _rows(path)}
    assert {i: r["correct"] for i, r in rows.items()} == RIGHT
    assert rows["q5"]["pass_rate"] == 0.75 and rows["q5"]["samples"] == 4

    # A narrower band (at least 2 right) from the same rows: nothing is sampled again.
    again = Policy()
    kept, counts = filter_items(_items(), again, _settings(min_correct=2), path, seed=7)
    assert not again.calls and counts["reused"] == 8
    assert [it.id for it in kept] == ["q2", "q5", "q7"] and counts["too_hard"] == 3


def test_a_resumed_filter_does_not_resample_finished_questions(tmp_path):
    whole = Policy()
    kept_whole, counts_whole = filter_items(_items(), whole, _settings(), tmp_path / "whole.jsonl", seed=7)
    assert len(whole.calls) == 3  # 8 questions, 3 per call

    path = tmp_path / "grpo" / "pass_rates.jsonl"
    with pytest.raises(KeyboardInterrupt):
        filter_items(_items(), Policy(fail_after=2), _settings(), path, seed=7)
    finished = [r["id"] for r in _rows(path)]
    assert len(finished) == 6
    # A kill while the next row was being written tears a line: it is cut off, not read.
    with path.open("a") as fh:
        fh.write('{"id": "q7", "key": "')

    resumed = Policy()
    kept, counts = filter_items(_items(), resumed, _settings(), path, seed=7)
    assert [ids for ids, _ in resumed.calls] == [whole.calls[2][0]]  # only the unfinished call...
    assert resumed.calls[0][1] == whole.calls[2][1]  # ...with the seed it had in the whole run
    assert not set(finished) & set(resumed.calls[0][0])
    assert counts["reused"] == 6 and counts["sampled"] == 2
    assert kept == kept_whole and _same(counts) == _same(counts_whole)
    assert path.read_text() == (tmp_path / "whole.jsonl").read_text()  # torn line gone, same rows, same order


def test_a_stale_estimate_is_not_reused(tmp_path):
    path = tmp_path / "pass_rates.jsonl"
    model = {"model": "sft/merged", "weights": 1}
    filter_items(_items(), Policy(), _settings(), path, seed=7, key=model)
    for key, seed, k in (({"model": "sft/merged", "weights": 2}, 7, 4),  # the SFT model was trained again
                         (model, 8, 4), (model, 7, 6)):
        policy = Policy(k)
        settings = DifficultyFilterSettings(enabled=True, samples=k, prompts_per_call=3)
        _, counts = filter_items(_items(), policy, settings, path, seed=seed, key=key)
        assert counts["reused"] == 0 and counts["sampled"] == 8 and len(policy.calls) == 3, (key, seed, k)
        assert len(_rows(path)) == 8 and all(r["samples"] == k for r in _rows(path))  # stale rows dropped


def test_a_question_whose_text_changed_is_estimated_again(tmp_path):
    path = tmp_path / "pass_rates.jsonl"
    filter_items(_items(), Policy(), _settings(), path, seed=7)
    items = _items()
    items[2] = Item(id="q2", question="Question q2, reworded?", answer="B", options=OPTIONS)
    policy = Policy()
    _, counts = filter_items(items, policy, _settings(), path, seed=7)
    assert counts["sampled"] == 1 and any("q2" in ids for ids, _ in policy.calls)


def test_max_prompts_estimates_a_seeded_prefix_and_growing_it_reuses_the_rows(tmp_path):
    path = tmp_path / "pass_rates.jsonl"
    first = Policy()
    kept, counts = filter_items(_items(), first, _settings(max_prompts=3), path, seed=7)
    assert counts["estimated"] == 3 and counts["not_estimated"] == 5 and len(_rows(path)) == 3
    assert {it.id for it in kept} <= {i for ids, _ in first.calls for i in ids}  # unestimated: not trained on
    more = Policy()
    _, counts = filter_items(_items(), more, _settings(max_prompts=6), path, seed=7)
    assert counts["reused"] == 3 and counts["sampled"] == 3
    assert more.calls[0][1] == first.calls[0][1] + 1  # the second call of the same shuffle


def test_processes_share_the_calls_and_agree(tmp_path, monkeypatch):
    monkeypatch.setattr(difficulty, "POLL_S", 0.01)
    whole = Policy()
    expected = filter_items(_items(), whole, _settings(), tmp_path / "whole.jsonl", seed=7)
    path = tmp_path / "grpo" / "pass_rates.jsonl"
    policies, results = [Policy(), Policy()], [None, None]

    def rank(r):
        results[r] = filter_items(_items(), policies[r], _settings(), path, seed=7, rank=r, world=2)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert policies[0].calls == [whole.calls[0], whole.calls[2]] and policies[1].calls == [whole.calls[1]]
    for kept, counts in results:
        assert kept == expected[0] and _same(counts) == _same(expected[1])
    assert path.read_text() == (tmp_path / "whole.jsonl").read_text()  # merged in the whole run's order
    assert not (path.parent / difficulty.PARTS).exists()


def test_a_band_nothing_could_pass_is_refused(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: x\ngrpo:\n  difficulty_filter:\n    samples: 2\n    min_correct: 2\n")
    assert main(["validate", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "recipe.yaml:5" in err and "grpo.difficulty_filter" in err and "min_wrong=1" in err


TINY = [
    "model.name_or_path=gazal:tiny-qwen3", "data.grpo_limit=8", "grpo.max_completion_length=12",
    "grpo.rewards=[{name: accuracy}, {name: format}]", "grpo.skip_reward_audit=true",
    "grpo.per_device_train_batch_size=4", "grpo.gradient_accumulation_steps=1",
    "grpo.max_steps=1", "grpo.difficulty_filter.enabled=true", "grpo.difficulty_filter.prompts_per_call=4",
]


def test_the_grpo_stage_filters_before_training_and_reuses_its_estimate(tmp_path, capsys):
    run = tmp_path / "run"
    # The tiny random model never answers: under the default band every question is too hard.
    assert main(["grpo", "--config", "demo", "--run-dir", str(run), *TINY]) == 2
    err = capsys.readouterr().err
    assert "grpo.difficulty_filter: no question kept of 8" in err and "8 too hard" in err
    rows = _rows(run / "grpo" / "pass_rates.jsonl")
    assert len(rows) == 8 and all(r["correct"] == 0 and r["samples"] == 4 for r in rows)

    # Run again with a band that keeps questions no completion answers: the estimate is reused.
    assert main(["grpo", "--config", "demo", "--run-dir", str(run), *TINY,
                 "grpo.difficulty_filter.min_correct=0"]) == 0
    summary = json.loads((run / "grpo" / "summary.json").read_text())
    counts = summary["difficulty_filter"]
    assert counts["reused"] == 8 and counts["sampled"] == 0 and counts["kept"] == 8 and counts["too_hard"] == 0
    assert summary["questions"] == 8 and summary["steps"] == 1
    assert _rows(run / "grpo" / "pass_rates.jsonl") == rows
