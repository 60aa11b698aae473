"""`gazal rewards audit --judge`: the reward audit's honest and hack completions through the judge
reward, graded by the rubric-reading stand-in of tests/test_judge.py over loopback HTTP."""

import json
import re

import pytest
from test_judge import Grader, asked, fresh, server, without  # noqa: F401 (fixtures)

from gazal import judge_audit, recipes
from gazal.audit import KNOWN_OPEN, RED_TEAM
from gazal.cli import main
from gazal.errors import GazalError
from gazal.judge import default_rubric_path

# Another case's reasoning, keyword and cue-word lists, and the families the lexical case_reasoning
# reward still paid when the judge audit was written.
NAMED = ("another_cases_reasoning", "case_keyword_list", "cue_word_list")
LEXICAL_OPEN = ("varied_filler_per_finding", "numbers_as_knowledge", "case_windows_with_filler")


def audit(server, rubric=None, n=1):
    recipe = recipes.load_recipe("demo")
    params = judge_audit.judge_params(recipe, f"{server}/good/v1", "grader", rubric and str(rubric))
    return judge_audit.run_judge_audit(recipe, {**params, "max_retries": 0}, n)


def by_family(rows):
    return {r.family: r for r in rows}


def test_the_shipped_rubric_grades_every_hack_below_honest(server):
    rows, cost = audit(server)
    assert {r.question for r in rows} == {"sft-0001"} and len(rows) == len(set(r.family for r in rows))
    rows = by_family(rows)
    assert [f for f in NAMED + LEXICAL_OPEN if rows[f].outcome != "below"] == []
    # The grader ranks them, not the reward's format gate (which may floor some before asking).
    assert len([f for f in NAMED + LEXICAL_OPEN if not rows[f].gated]) >= 4
    assert rows["another_cases_reasoning"].honest == 1.0 and all(rows[f].hack <= 0.6 for f in NAMED)
    graded = [r for r in rows.values() if not r.gated]
    # Honest and each graded hack are asked once; the server's token counts are summed.
    assert cost.requests == len(graded) + 1 == len(Grader.seen)
    assert cost.prompt_tokens == sum(len(s["body"]["messages"][0]["content"].split()) for s in Grader.seen)
    assert cost.completion_tokens > 0 and cost.failures == {} and cost.cache_hits == 0 and cost.seconds > 0
    assert rows["bare_answer"].gated and rows["bare_answer"].hack == 0.0


def test_without_the_discrimination_question_option_ignoring_templates_tie(server, tmp_path):
    """Templates that reject the rival options by letter, with reasons about nothing, are caught by
    the discrimination question alone: cut it and they tie honest reasoning."""
    cut = tmp_path / "cut.md"
    cut.write_text(without(default_rubric_path().read_text(), "discriminate"))
    rows = by_family(audit(server, cut)[0])
    for family in ("varied_filler_per_finding", "case_windows_with_filler"):
        assert rows[family].outcome == "tie", family
    assert all(rows[f].outcome == "below" for f in NAMED)  # the other questions still catch these


def test_a_rubric_that_asks_nothing_ranks_nothing(server, tmp_path):
    flat = tmp_path / "flat.md"
    flat.write_text('Grade:\n<reasoning>\n$reasoning\n</reasoning>\nReply {"score": N}.\n')
    assert asked(flat.read_text()) == []
    rows = audit(server, flat)[0]
    assert {r.outcome for r in rows if not r.gated} == {"tie"}
    assert {r.outcome for r in rows if r.gated} == {"below"}  # the reward's own floor, not the grader


def test_the_report_counts_per_family_and_the_cost(server):
    rows, cost = audit(server, n=2)
    table = {t["family"]: t for t in judge_audit.family_table(rows)}
    assert all(t["cases"] == 2 and t["below"] + t["tie"] + t["above"] + t["failed"] == 2 for t in table.values())
    assert table["bare_answer"]["gated"] == 2
    assert all(t["lexical_open"] == (f in KNOWN_OPEN) and t["set"] == ("red team" if f in RED_TEAM else "development")
               for f, t in table.items())
    lines = judge_audit.format_report(rows, cost)
    assert lines[0].split() == ["hack", "family", "cases", "below", "tie", "above", "failed", "gated"]
    assert re.match(r"bare_answer\s+2\s+2\s+0\s+0\s+0\s+2$", lines[1])
    assert any(line.startswith("development hacks: ") for line in lines)
    assert lines[-1].startswith(f"judge cost: {cost.requests} requests, {cost.prompt_tokens} prompt + ")
    assert "failures: none, cache hits 0" in lines[-1]


def test_cli_with_the_grader_on_the_command_line(server, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["rewards", "audit", "--judge", "--questions", "1", "--judge-url", f"{server}/good/v1",
                 "--judge-model", "grader", "--judge-max-tokens", "16", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "another_cases_reasoning" in printed and "judge cost: " in printed and f"wrote {out}" in printed
    data = json.loads(out.read_text())
    assert {"rows", "families", "cost"} <= set(data) and data["rows"][0]["outcome"] in ("below", "tie", "above")
    assert {s["body"]["max_tokens"] for s in Grader.seen} == {16} and {s["body"]["model"] for s in Grader.seen} == {
        "grader"}


def test_cli_takes_the_recipes_judge_and_its_cache(server, tmp_path, capsys):
    cache = tmp_path / "judge.jsonl"
    rewards = (f"grpo.rewards=[{{name: accuracy}}, {{name: judge, weight: 0.5, params: {{base_url: '{server}/good/v1',"
               f" model: grader, max_retries: 0, cache_path: '{cache}'}}}}]")
    assert main(["rewards", "audit", "--judge", "--questions", "1", rewards]) == 0
    first = capsys.readouterr().out
    asked_once = len(Grader.seen)
    assert asked_once > 0 and f"judge cost: {asked_once} requests" in first and "cache hits 0" in first
    assert main(["rewards", "audit", "--judge", "--questions", "1", rewards]) == 0
    again = capsys.readouterr().out
    assert len(Grader.seen) == asked_once and "judge cost: 0 requests" in again
    assert f"cache hits {asked_once}" in again


def test_cli_a_malformed_grader_is_measured_not_refused(server, capsys):
    assert main(["rewards", "audit", "--judge", "--questions", "1", "--judge-url", f"{server}/prose/v1",
                 "--judge-model", "grader"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"another_cases_reasoning\s+1\s+0\s+0\s+0\s+1\s+0", out)
    assert re.search(r"failures: malformed \d+", out)


@pytest.mark.parametrize("argv,expected", [
    (["--judge"], ["no `judge` reward", "--judge-url and --judge-model"]),
    (["--judge", "--judge-url", "http://127.0.0.1:1/v1"], ["pass --judge-model"]),
    (["--judge-url", "http://127.0.0.1:1/v1"], ["apply only with --judge"]),
    (["--judge", "--judge-url", "http://127.0.0.1:1/v1", "--judge-model", "m", "--rubric", "/no/such.md"],
     ["judge rubric not found"]),
    (["--judge", "grpo.rewards=[{name: judge, params: {base_url: 'http://127.0.0.1:1/v1', model: m, max_retries: 0}}]"],
     ["every request to http://127.0.0.1:1/v1 failed", "connection_error"]),
])
def test_cli_missing_or_unreachable_grader_exits_2(argv, expected, capsys):
    assert main(["rewards", "audit", "--questions", "1", *argv]) == 2
    err = capsys.readouterr().err
    for piece in expected:
        assert piece in err, err


def test_judge_params_recipe_then_command_line():
    recipe = recipes.load_recipe("demo", ["grpo.rewards=[{name: accuracy}, {name: judge, params: {base_url: "
                                          "'http://a:1/v1', model: m, max_tokens: 64, concurrency: 4}}]"])
    assert judge_audit.judge_params(recipe) == {"base_url": "http://a:1/v1", "model": "m", "max_tokens": 64,
                                                "concurrency": 4}
    assert judge_audit.judge_params(recipe, "http://b:2/v1", None, "r.md", 16) == {
        "base_url": "http://b:2/v1", "model": "m", "max_tokens": 16, "concurrency": 4, "rubric": "r.md"}
    with pytest.raises(GazalError, match="--judge-model"):
        judge_audit.judge_params(recipes.load_recipe("demo"), "http://b:2/v1")


def test_the_32b_recipe_documents_a_judge_it_does_not_need(tmp_path):
    """Shipped, the 32B recipe has no judge reward (validation and the offline reward audit need no
    grader); its documented entry, uncommented, is a valid recipe whose judge the audit can ask."""
    path = recipes.shipped_recipes()["gazal-r1-32b"]
    assert not [s for s in recipes.load_recipe("gazal-r1-32b").grpo.rewards if s.name == "judge"]
    text = path.read_text()
    block = text[text.index("# >>> judge"):text.index("# <<< judge")]
    assert "vllm serve " in block and "--port 8001" in block
    assert "gazal rewards audit --config gazal-r1-32b --judge" in block
    assert "135M" in block
    entry = [line for line in block.splitlines() if line.lstrip().startswith("# - {name: judge")]
    assert len(entry) == 1
    enabled = tmp_path / "gazal-r1-32b-judged.yaml"
    enabled.write_text(text.replace(entry[0], entry[0].replace("# - {name: judge", "- {name: judge")))
    recipe = recipes.load_recipe(str(enabled))
    params = judge_audit.judge_params(recipe)
    assert params["base_url"].endswith(":8001/v1") and params["model"] == "grader"
