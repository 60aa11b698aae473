"""Reward components follow TRL's contract and use the shared extractor."""

from gazal.rewards import resolve_reward

OPTS = {"A": "Iron", "B": "Folate", "C": "Vitamin B12", "D": "Vitamin B1"}


def chat(text):
    return [{"role": "assistant", "content": text}]


def test_accuracy_uses_the_shared_extractor_and_skips_bad_gold():
    acc = resolve_reward("accuracy")
    completions = [chat("<think>r</think>\nThe answer is C"), chat("<think>r</think>\nThe answer is B or C"),
                   chat("<think>The answer is C</think>"), "The answer is Vitamin B12", chat("The answer is C")]
    got = acc(completions=completions, answer=["C", "C", "C", "C", "Z"], options=[OPTS] * 5)
    assert got == [1.0, 0.0, 0.0, 1.0, None]


def test_accuracy_drops_missing_letters_from_arrow_structs():
    acc = resolve_reward("accuracy")
    padded = {**OPTS, "E": None}  # how Arrow returns a 4-option row in a column that also has 5-option rows
    assert acc(completions=["The answer is E"], answer=["A"], options=[padded]) == [0.0]
    assert acc(completions=["The answer is E"], answer=["E"], options=[padded]) == [None]


def test_accuracy_yes_no_maybe_via_labels():
    acc = resolve_reward("accuracy")
    got = acc(completions=["<think>r</think>The answer is no"] * 2, answer=["no", "yes"],
              labels=[["yes", "no", "maybe"]] * 2)
    assert got == [1.0, 0.0]


def test_format():
    fmt = resolve_reward("format")
    cases = {
        "<think>\nsteps\n</think>\nThe answer is B": 1.0,
        "<think></think>\nThe answer is B": 0.0,  # empty reasoning
        "The answer is B": 0.0,  # no reasoning
        "<think>steps</think>": 0.0,  # nothing after the reasoning
        "<think>steps": 0.0,  # never closed
        "The answer is B <think>steps</think> B": 0.0,  # reasoning not first
        "<think>a</think><think>b</think>B": 0.0,  # several blocks
        "<think>a<think>b</think>c</think>B": 0.0,  # nested
    }
    assert fmt(completions=list(cases)) == list(cases.values())


def test_reward_names_drive_trl_metric_names():
    assert resolve_reward("accuracy").__name__ == "accuracy"
    assert resolve_reward("format").__name__ == "format"
