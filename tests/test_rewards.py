"""Reward components: TRL's contract, the shared extractor, bounds, None handling, anti-gaming."""

import json
import math

import pytest

from gazal.audit import (KNOWN_OPEN, SEMANTIC, advantage_audit, advantage_verdicts, audit_set, hacks, honest,
                         reward_tokenizer, run_audit)
from gazal.cli import main
from gazal.recipes import load_recipe
from gazal.models import TINY_QWEN3, load_tokenizer, resolve_model
from gazal.rewards import REWARDS, RewardSet, parse, resolve_reward
from gazal.tasks import Item, messages

OPTS = {"A": "Iron", "B": "Folate", "C": "Vitamin B12", "D": "Vitamin B1"}
GOOD = "<think>\n1. Findings: macrocytic anaemia with neuropathy.\n2. Differential: folate vs B12.\n</think>\nThe answer is C."
ITEM = Item(id="q", question="A vegan has macrocytic anaemia and neuropathy. Which deficiency?", answer="C",
            options=OPTS)


def chat(text):
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model(TINY_QWEN3))


def test_accuracy_uses_the_shared_extractor_and_skips_bad_gold():
    acc = resolve_reward("accuracy")
    completions = [chat(GOOD), chat("<think>r</think>\nThe answer is B or C"),
                   chat("<think>The answer is C</think>"), "The answer is Vitamin B12", chat(GOOD), chat(GOOD)]
    got = acc(completions=completions, answer=["C", "C", "C", "C", "Z", None], options=[OPTS] * 6)
    assert got == [1.0, 0.0, 0.0, 1.0, None, None]


def test_accuracy_logs_hedge_and_no_answer_rates():
    logged = {}
    resolve_reward("accuracy")(completions=["The answer is B or C", "nothing", GOOD, GOOD], answer=["C"] * 4,
                               options=[OPTS] * 4, log_metric=lambda k, v: logged.__setitem__(k, v))
    assert logged == {"gazal/hedge_rate": 0.25, "gazal/no_answer_rate": 0.25}


def test_accuracy_drops_missing_letters_from_arrow_structs():
    acc = resolve_reward("accuracy")
    padded = {**OPTS, "E": None}  # how Arrow returns a 4-option row in a column that also has 5-option rows
    assert acc(completions=["The answer is E"], answer=["A"], options=[padded]) == [0.0]
    assert acc(completions=["The answer is E"], answer=["E"], options=[padded]) == [None]


def test_accuracy_yes_no_maybe_via_labels():
    got = resolve_reward("accuracy")(completions=["<think>r</think>The answer is no"] * 2, answer=["no", "yes"],
                                     labels=[["yes", "no", "maybe"]] * 2)
    assert got == [1.0, 0.0]


FORMAT_CASES = {
    GOOD: 1.0,
    "<think>\nsteps\n</think>\nThe answer is C. Vitamin B12 deficiency explains both findings.": 1.0,
    "<think>\nsteps\n</think>\nThe answer is C.\nFinal answer: C": 1.0,  # restated, not conflicting
    "<think></think>\nThe answer is C": 0.0,  # empty reasoning
    "<think>   </think>\nThe answer is C": 0.0,  # blank reasoning
    "The answer is C": 0.0,  # no reasoning
    "<think>steps</think>": 0.0,  # nothing after the reasoning
    "<think>steps</think>\nI think it is fine.": 0.0,  # no answer statement
    "<think>steps": 0.0,  # never closed
    "The answer is C <think>steps</think> C": 0.0,  # reasoning not first
    "<think>a</think><think>b</think>The answer is C": 0.0,  # several blocks
    "<think>a<think>b</think>c</think>The answer is C": 0.0,  # nested
    "<think>a</think></think></think>The answer is C": 0.0,  # tag spam
    "<think>a</think>\nThe answer is B or C": 0.0,  # hedge
    "<think>a</think>\nThe answer is E": 0.0,  # not an option
    "<think>a</think>\nThe answer is B.\nThe answer is C.": 0.0,  # conflicting
    "<think>a</think>\nThe answer is C.\n" + "More discussion of the case follows here. " * 10: 0.0,  # trailing essay
}


def test_format():
    fmt = resolve_reward("format")
    assert fmt(completions=list(FORMAT_CASES), options=[OPTS] * len(FORMAT_CASES)) == list(FORMAT_CASES.values())


def test_cosine_length_is_in_tokens_bounded_and_shapes_correct_vs_wrong(tokenizer):
    fn = resolve_reward("cosine_length", {"max_len": 100}, tokenizer)
    ids = [[0] * n for n in (0, 50, 100, 400)]
    right = fn(completions=[GOOD] * 4, answer=["C"] * 4, options=[OPTS] * 4, completion_ids=ids)
    wrong = fn(completions=[GOOD] * 4, answer=["B"] * 4, options=[OPTS] * 4, completion_ids=ids)
    assert right[0] == pytest.approx(1.0) and right[1] == pytest.approx(0.75) and right[2] == pytest.approx(0.5)
    assert right[3] == pytest.approx(0.5)  # beyond max_len: clipped, never out of range
    assert wrong[0] == pytest.approx(-0.5) and wrong[2] == pytest.approx(0.0) and wrong[3] == pytest.approx(0.0)
    assert right == sorted(right, reverse=True) and wrong == sorted(wrong)  # shorter correct, longer wrong favoured
    # Ill-formed completions cannot collect it: they get the floor of the range.
    bare = fn(completions=["The answer is C"], answer=["C"], options=[OPTS], completion_ids=[[0]])
    assert bare == [-0.5]
    assert fn(completions=[GOOD], answer=["Z"], options=[OPTS], completion_ids=[[0]]) == [None]
    # Without completion_ids it counts tokens with the tokenizer, not characters.
    n_tokens = len(tokenizer(GOOD, add_special_tokens=False)["input_ids"])
    assert fn(completions=[GOOD], answer=["C"], options=[OPTS]) == fn(
        completions=[GOOD], answer=["C"], options=[OPTS], completion_ids=[[0] * n_tokens])


@pytest.mark.parametrize("params", [{"max_len": 7}, {"max_len": 3000, "min_value_wrong": -2, "max_value_correct": 3}])
def test_cosine_length_output_always_within_its_bounds(params):
    fn = resolve_reward("cosine_length", params)
    bounds = [params.get("min_value_wrong", -0.5), params.get("max_value_correct", 1.0)]
    for n in range(0, 4000, 37):
        for gold in ("C", "B"):
            v = fn(completions=[GOOD], answer=[gold], options=[OPTS], completion_ids=[[0] * n])[0]
            assert bounds[0] - 1e-9 <= v <= bounds[1] + 1e-9


def test_repetition_penalty():
    fn = resolve_reward("repetition", {"ngram_size": 3, "max_penalty": -1.0})
    padded = "<think>\n" + "check the findings again " * 30 + "\n</think>\nThe answer is C."
    got = fn(completions=[GOOD, padded, "The answer is C"], options=[OPTS] * 3)
    assert got[0] == 0.0 and -1.0 <= got[1] < -0.8 and got[2] == -1.0


def test_clinical_structure():
    fn = resolve_reward("clinical_structure")
    plain = "<think>it is that one</think>\nThe answer is C."
    echo = f"<think>{ITEM.question}</think>\nThe answer is C."
    structured = ("<think>\n1. Findings: macrocytic anaemia and neuropathy in a vegan.\n2. Differential: folate "
                  "versus B12 deficiency.\n3. Discriminating: neuropathy points to B12, because folate deficiency "
                  "spares the nerves; therefore B12 is the most likely.\n</think>\nThe answer is C.")
    got = fn(completions=[structured, plain, echo, "The answer is C"], options=[OPTS] * 4,
             prompts=[[{"role": "user", "content": ITEM.question}]] * 4)
    assert got[0] == 1.0 and got[1] == 0.0 and got[2] == 0.0 and got[3] == 0.0
    assert all(0.0 <= v <= 1.0 for v in got)


def test_prompt_echoed_as_reasoning_earns_no_length_or_quality_reward():
    echo = f"<think>{ITEM.question}</think>\nThe answer is C."
    prompts = [[{"role": "user", "content": ITEM.question}]] * 2
    cos = resolve_reward("cosine_length", {"max_len": 200})
    got = cos(completions=[GOOD, echo], answer=["C"] * 2, options=[OPTS] * 2, completion_ids=[[0] * 20] * 2,
              prompts=prompts)
    assert got[0] > 0.5 and got[1] == -0.5  # the echo is short and correct, and still gets the floor
    rep = resolve_reward("repetition")
    assert rep(completions=[GOOD, echo], options=[OPTS] * 2, prompts=prompts) == [0.0, -1.0]


def test_overlong():
    fn = resolve_reward("overlong", {"cache": 10}, max_completion_length=100)
    got = fn(completions=["x"] * 5, completion_ids=[[0] * n for n in (50, 90, 95, 100, 130)])
    assert got == [0.0, 0.0, -0.5, -1.0, -1.0]


def test_bad_parameters_are_rejected():
    with pytest.raises(TypeError):
        resolve_reward("accuracy", {"scale": 2})
    with pytest.raises(ValueError):
        resolve_reward("overlong", {"cache": 500}, max_completion_length=256)


def test_registry_and_metric_names():
    assert set(REWARDS) == {"accuracy", "format", "cosine_length", "repetition", "clinical_structure",
                            "case_reasoning", "overlong", "judge"}
    assert resolve_reward("format").__name__ == "format"


def test_cosine_length_floor_pays_nothing_for_being_shorter():
    fn = resolve_reward("cosine_length", {"max_len": 200, "floor_len": 100})
    ids = [[0] * n for n in (5, 60, 100, 150, 200)]
    right = fn(completions=[GOOD] * 5, answer=["C"] * 5, options=[OPTS] * 5, completion_ids=ids)
    wrong = fn(completions=[GOOD] * 5, answer=["B"] * 5, options=[OPTS] * 5, completion_ids=ids)
    assert right[:3] == [pytest.approx(1.0)] * 3 and right[3] == pytest.approx(0.75) and right[4] == pytest.approx(0.5)
    assert wrong[:3] == [pytest.approx(-0.5)] * 3 and wrong[4] == pytest.approx(0.0)
    with pytest.raises(ValueError):
        resolve_reward("cosine_length", {"max_len": 100, "floor_len": 100})


# The shipped recipes' old reward sets (clinical_structure + cosine_length without a floor), kept as
# the regression case: a content-free template beat the seed's own reasoning under both.
OLD_REWARDS = {
    "demo": "grpo.rewards=[{name: accuracy, weight: 1.0}, {name: format, weight: 0.5}, "
            "{name: cosine_length, weight: 0.5, params: {max_len: 192}}, {name: repetition, weight: 0.5}, "
            "{name: clinical_structure, weight: 0.25}, {name: overlong, weight: 0.5, params: {cache: 48}}]",
    "gazal-r1-32b": "grpo.rewards=[{name: accuracy, weight: 1.0}, {name: format, weight: 0.2}, "
                    "{name: cosine_length, weight: 0.5, params: {max_len: 2048}}, {name: repetition, weight: 0.5}, "
                    "{name: clinical_structure, weight: 0.2}, {name: overlong, weight: 0.5, params: {cache: 256}}]",
}
TEMPLATE = "<think>\n1. History.\n2. Exam.\n3. Differential: risk, therefore because.\n</think>\nThe answer is {}."


@pytest.mark.parametrize("name", ["demo", "gazal-r1-32b"])
def test_yesterdays_reward_loses_to_a_content_free_template(name):
    tokenizer = reward_tokenizer(load_recipe(name))
    old = load_recipe(name, [OLD_REWARDS[name]])
    failed = {r.hack for r in run_audit(old, tokenizer) if not r.passed}
    assert {"content_free_template", "cue_word_list", "generic_steps_with_options"} <= failed
    assert not [r for r in run_audit(load_recipe(name), tokenizer) if not r.passed and r.gated]


def test_case_reasoning_pays_the_seed_reasoning_of_every_case_above_every_empty_family():
    """On all 163 seed cases, not only the 8 the audit samples: the seed's own reasoning beats every
    family that does not reason about the case, and the same reasoning earns less when put to a
    different question."""
    fn = resolve_reward("case_reasoning")
    recipe = load_recipe("demo")
    families = ["content_free_template", "cue_word_list", "case_keyword_list", "options_pasted",
                "generic_steps_with_options", "options_dismissed_without_findings", "findings_with_empty_relations",
                "varied_empty_padding", "another_cases_reasoning", "prompt_echoed_as_reasoning", "case_words_in_filler"]
    pairs = audit_set(163)
    assert len(pairs) == 163
    for case, other in pairs:
        full = honest(case)["full"]
        gaming = hacks(case, other)
        n = 1 + len(families)
        got = fn(completions=[full] + [gaming[f] for f in families], prompts=[messages(case.item, recipe.task)] * n,
                 options=[case.item.options] * n)
        assert 0.0 < got[0] <= 1.0 and all(0.0 <= v < got[0] for v in got[1:]), (case.item.id, got)
        elsewhere = full.rsplit("The answer is", 1)[0] + f"The answer is {other.item.answer}."
        there = fn(completions=[elsewhere], prompts=[messages(other.item, recipe.task)], options=[other.item.options])
        assert there[0] < got[0], (case.item.id, other.item.id)


def test_case_reasoning_floor_and_yes_no_questions():
    fn = resolve_reward("case_reasoning")
    context = ("In a cohort of 412 adults with type 2 diabetes, daily metformin was associated with lower rates "
               "of colorectal adenoma on surveillance colonoscopy after adjustment for age and obesity.")
    prompt = [{"role": "user", "content": f"Context: {context}\n\nQuestion: Does metformin lower adenoma risk?"}]
    reasoned = ("<think>\nThe cohort of 412 diabetic adults links metformin with fewer colorectal adenomas, which "
                "suggests a protective effect. The association held after adjustment for age and obesity, so those "
                "confounders do not explain it. Because this is an observational cohort, confounding by indication "
                "remains possible, so the evidence supports a cautious yes for metformin.\n</think>\nThe answer is yes.")
    template = TEMPLATE.format("yes")
    got = fn(completions=[reasoned, template, "The answer is yes.", f"<think>{context}</think>\nThe answer is yes."],
             prompts=[prompt] * 4, labels=[["yes", "no", "maybe"]] * 4)
    assert got[0] > 0.5 and got[1:] == [0.0, 0.0, 0.0]  # template, no reasoning, echo: the floor


@pytest.mark.parametrize("name", ["demo", "gazal-r1-32b"])
def test_audit_passes_for_shipped_recipes(name, capsys):
    # Every seed case, not just the 8 the pre-GRPO audit samples, and both hack sets.
    # The demo measures lengths with its own tokenizer; the 32B recipe's is not here offline, and the
    # tiny model's (about 1.6 x as many tokens) stands in, which only makes honest completions longer.
    assert main(["rewards", "audit", "--config", name, "--questions", "163"]) == 0
    out = capsys.readouterr().out
    assert " 0 failed" in out and "content_free_template" in out and "another_cases_reasoning" in out
    assert "rt_borrowed_reasoning" in out and "red team" in out  # the red-team set is reported too
    assert "GAMES THE REWARD" not in out and "OVER THE BAR" not in out
    assert "KNOWN OPEN" in out  # the open families are shown, not hidden


@pytest.mark.parametrize("name", ["demo", "gazal-r1-32b"])
def test_known_open_families_still_fail_and_no_other_does(name):
    # A family leaves audit.KNOWN_OPEN when it stops failing: this fails the day one does.
    recipe = load_recipe(name)
    tokenizer = reward_tokenizer(recipe)
    failing = {r.hack for r in run_audit(recipe, tokenizer, 163) if not r.passed and r.hack not in SEMANTIC}
    failing |= {f for f, v in advantage_verdicts(advantage_audit(recipe, tokenizer, 163)).items() if not v["passed"]}
    assert failing <= set(KNOWN_OPEN)
    if name == "gazal-r1-32b":  # each listed family fails for at least one shipped recipe
        demo = load_recipe("demo")
        demo_tok = reward_tokenizer(demo)
        failing |= {r.hack for r in run_audit(demo, demo_tok, 163) if not r.passed and r.hack not in SEMANTIC}
        assert failing == set(KNOWN_OPEN)


def test_audit_fails_for_an_accuracy_only_reward(tokenizer, capsys):
    args = ["rewards", "audit", "--config", "demo", "grpo.rewards=[{name: accuracy}]"]
    assert main(args) == 1
    assert "GAMES THE REWARD" in capsys.readouterr().out


def test_rewards_score_cli(tmp_path, capsys):
    lines = [{"completion": GOOD, "answer": "C", "options": OPTS, "question": ITEM.question},
             {"completion": "The answer is C", "answer": "C", "options": OPTS},
             {"completion": "<think>r</think>\nThe answer is no", "answer": "no", "labels": ["yes", "no", "maybe"]}]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "scored.jsonl"
    assert main(["rewards", "score", str(path), "--out", str(out), "--config", "demo",
                 "model.name_or_path=gazal:tiny-qwen3"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0]["rewards"]["accuracy"] == 1.0 and rows[0]["rewards"]["format"] == 1.0
    assert rows[1]["rewards"]["format"] == 0.0 and rows[0]["total"] > rows[1]["total"]
    weights = {s.name: s.weight for s in load_recipe("demo").grpo.rewards}
    assert rows[0]["total"] == pytest.approx(sum(weights[k] * v for k, v in rows[0]["rewards"].items()))
    assert "cosine_length" in capsys.readouterr().out
    path.write_text(json.dumps({"completion": "x", "answer": "C"}) + "\n")
    assert main(["rewards", "score", str(path), "--config", "demo", "model.name_or_path=gazal:tiny-qwen3"]) == 2


def test_repetition_has_a_dead_zone_and_case_reasoning_saturates():
    rep = resolve_reward("repetition", {"tolerance": 0.1})
    words = " ".join(f"w{i}" for i in range(40))
    few = f"<think>{words} w0 w1 w2</think>\nThe answer is C."  # 1 of 40 trigrams repeated: inside the zone
    many = f"<think>{words} {words}</think>\nThe answer is C."  # about half repeated
    got = rep(completions=[few, many], options=[OPTS, OPTS])
    share = [-v for v in resolve_reward("repetition", {"tolerance": 0.0})(completions=[few, many], options=[OPTS, OPTS])]
    assert 0 < share[0] < 0.1 < 0.4 < share[1]  # the repeated shares, without a dead zone
    assert got[0] == 0.0 and got[1] == pytest.approx(-(share[1] - 0.1) / 0.9)
    graded, capped = resolve_reward("case_reasoning", {"saturate_at": 1.0}), resolve_reward("case_reasoning")
    task = load_recipe("demo").task
    for case, _ in audit_set(8):
        cut = honest(case)["discriminating_conclusion"]
        column = {"completions": [cut], "prompts": [messages(case.item, task)], "options": [case.item.options]}
        raw, paid = graded(**column)[0], capped(**column)[0]
        assert 0 < raw and paid == pytest.approx(min(1.0, raw / 0.6))
    with pytest.raises(ValueError):
        resolve_reward("case_reasoning", {"saturate_at": 0})
