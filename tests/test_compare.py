"""`gazal compare`: paired tests between two evaluated runs, checked against hand computations."""

import json
import math
import sys

import pytest

from gazal.cli import main
from gazal.compare import compare_runs
from gazal.errors import GazalError

# A paired 2x2 table with a known difference: (A correct, B correct) per item.
# both 20, A only 2, B only 10, neither 8: accuracy A 22/40, B 30/40, B - A = +0.2.
PAIRS = [(1, 1)] * 20 + [(1, 0)] * 2 + [(0, 1)] * 10 + [(0, 0)] * 8


def _row(item: str, k: int, correct: bool, category: str | None = None) -> dict:
    return {"id": item, "sample": k, "category": category, "answer": "A", "prediction": "A" if correct else "B",
            "status": "ok", "correct": correct, "completion_tokens": 5, "truncated": False, "completion": "..."}


def _run(root, name: str, benchmarks: dict[str, list[dict]], mode_dir: str = "", results: dict | None = None):
    """A run directory with eval/<benchmark>/[mode_dir/]samples.jsonl written by hand."""
    run = root / name
    for bench, rows in benchmarks.items():
        folder = run / "eval" / bench / mode_dir
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "eval").mkdir(parents=True, exist_ok=True)
    if results is not None:
        (run / "eval" / "results.json").write_text(json.dumps({"benchmarks": results}))
    return run


def _single(pairs, side: int, ids=None) -> list[dict]:
    ids = ids or [f"q{i}" for i in range(len(pairs))]
    return [_row(i, 0, bool(p[side]), "step1" if n % 2 == 0 else "step2&3") for n, (i, p) in enumerate(zip(ids, pairs))]


def _pair_runs(tmp_path, pairs=PAIRS):
    a = _run(tmp_path, "a", {"medqa": _single(pairs, 0)})
    b = _run(tmp_path, "b", {"medqa": _single(pairs, 1)})
    return a, b


# Hand computations from the textbook formulas, written out here on purpose.

def _hand_mcnemar(b: int, c: int) -> float:
    """Exact McNemar: twice the lower binomial(b + c, 1/2) tail at min(b, c), at most 1."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) * 0.5**n for i in range(min(b, c) + 1)))


def _hand_wilson(x: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson (1927) in Newcombe's form: (2x + z^2 -/+ z sqrt(z^2 + 4 x (1 - x/n))) / (2 (n + z^2))."""
    root = z * math.sqrt(z * z + 4 * x * (1 - x / n))
    return ((2 * x + z * z - root) / (2 * (n + z * z)), (2 * x + z * z + root) / (2 * (n + z * z)))


def _hand_newcombe(a: int, b: int, c: int, d: int) -> tuple[float, float]:
    """Newcombe (1998) method 10 for pB - pA; a both right, b only A right, c only B right, d neither."""
    n = a + b + c + d
    pa, pb = (a + b) / n, (a + c) / n
    la, ua = _hand_wilson(a + b, n)
    lb, ub = _hand_wilson(a + c, n)
    denom = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    if denom == 0:
        phi = 0.0
    elif cross > n / 2:
        phi = (cross - n / 2) / math.sqrt(denom)
    elif cross >= 0:
        phi = 0.0
    else:
        phi = cross / math.sqrt(denom)
    diff = pb - pa
    lower = diff - math.sqrt((pb - lb) ** 2 - 2 * phi * (pb - lb) * (ua - pa) + (ua - pa) ** 2)
    upper = diff + math.sqrt((ub - pb) ** 2 - 2 * phi * (ub - pb) * (pa - la) + (pa - la) ** 2)
    return lower, upper


def test_hand_formulas_agree_with_literal_numbers():
    # The table above by hand: p = 2 (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 158 / 4096.
    assert _hand_mcnemar(2, 10) == 158 / 4096
    # Wilson for 22/40 from the usual centre/half-width form, as a check on the hand version.
    p, n, z = 22 / 40, 40, 1.96
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert _hand_wilson(22, 40) == pytest.approx((centre - half, centre + half), abs=1e-12)


def test_single_sample_mcnemar_and_newcombe_match_hand_computation(tmp_path):
    a, b = _pair_runs(tmp_path)
    res = compare_runs(a, b)
    m = res["benchmarks"]["medqa"]
    assert (m["n"], m["accuracy_a"], m["accuracy_b"]) == (40, 22 / 40, 30 / 40)
    assert m["difference"] == pytest.approx(0.2)
    assert m["test"] == "exact McNemar"
    assert m["p_value"] == pytest.approx(158 / 4096, rel=1e-9)
    assert m["ci95"] == pytest.approx(_hand_newcombe(20, 2, 10, 8), abs=1e-9)
    lo, hi = m["ci95"]
    assert 0 < lo < 0.2 < hi  # excludes 0, like the test
    assert m["verdict"] == "B better"
    assert m["table"] == {"both": 20, "a_only": 2, "b_only": 10, "neither": 8}
    # Per category: even-numbered items are step1.
    for cat, parity in (("step1", 0), ("step2&3", 1)):
        mine = [p for n, p in enumerate(PAIRS) if n % 2 == parity]
        got = m["per_category"][cat]
        assert got["n"] == len(mine)
        assert got["accuracy_a"] == pytest.approx(sum(p[0] for p in mine) / len(mine))
        assert got["accuracy_b"] == pytest.approx(sum(p[1] for p in mine) / len(mine))
        assert got["difference"] == pytest.approx(got["accuracy_b"] - got["accuracy_a"])


@pytest.mark.parametrize("table", [
    (20, 2, 10, 8),   # ad - bc > n/2: phi corrected by n/2
    (6, 4, 5, 5),     # 0 <= ad - bc <= n/2: phi 0
    (6, 5, 5, 4),     # ad - bc < 0
    (0, 0, 5, 5),     # A never right: a zero margin, phi 0
    (3, 9, 1, 7),     # A better
    (10, 0, 0, 10),   # no discordant items
])
def test_newcombe_and_mcnemar_over_tables(tmp_path, table):
    both, a_only, b_only, neither = table
    pairs = [(1, 1)] * both + [(1, 0)] * a_only + [(0, 1)] * b_only + [(0, 0)] * neither
    a, b = _pair_runs(tmp_path, pairs)
    m = compare_runs(a, b)["benchmarks"]["medqa"]
    assert m["p_value"] == pytest.approx(_hand_mcnemar(a_only, b_only), rel=1e-9)
    assert m["ci95"] == pytest.approx(_hand_newcombe(*table), abs=1e-9)


def test_swapping_the_runs_mirrors_the_result(tmp_path):
    a, b = _pair_runs(tmp_path)
    ab = compare_runs(a, b)["benchmarks"]["medqa"]
    ba = compare_runs(b, a)["benchmarks"]["medqa"]
    assert ba["difference"] == pytest.approx(-ab["difference"])
    assert ba["ci95"] == pytest.approx([-ab["ci95"][1], -ab["ci95"][0]], abs=1e-12)
    assert ba["p_value"] == pytest.approx(ab["p_value"])
    assert ba["verdict"] == "A better"


def test_mcnemar_without_scipy_is_the_same_exact_number(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # `from scipy.stats import ...` now fails
    a, b = _pair_runs(tmp_path)
    assert compare_runs(a, b)["benchmarks"]["medqa"]["p_value"] == pytest.approx(158 / 4096, rel=1e-12)
    for b_, c_ in ((30, 45), (0, 9), (7, 7), (1, 0)):
        pairs = [(1, 0)] * b_ + [(0, 1)] * c_ + [(1, 1)] * 3
        a, b = _pair_runs(tmp_path / f"{b_}-{c_}", pairs)
        assert compare_runs(a, b)["benchmarks"]["medqa"]["p_value"] == pytest.approx(_hand_mcnemar(b_, c_), rel=1e-12)


def _multi(n_items: int, hits, samples: int = 4) -> list[dict]:
    """n_items items with `samples` samples each; item i has its first hits(i) samples correct."""
    return [_row(f"q{i}", k, k < hits(i)) for i in range(n_items) for k in range(samples)]


def test_bootstrap_is_seeded_and_covers_the_true_difference(tmp_path):
    # Items are hard or easy: A gets 0 of 4 samples right on items i % 4 in (0, 1), 3 of 4 on the
    # others; B gets one more right on even items. Per-item differences are 0.25 and 0, half each:
    # true mean difference 0.125, population sd 0.125, so the paired standard error is
    # 0.125 / sqrt(200) and the normal 95% interval 0.125 +- 1.96 se. (Resampling A and B
    # independently would see A's spread between hard and easy items and be about 4x wider.)
    a = _run(tmp_path, "a", {"medqa": _multi(200, lambda i: 0 if i % 4 < 2 else 3)})
    b = _run(tmp_path, "b", {"medqa": _multi(200, lambda i: (0 if i % 4 < 2 else 3) + (i % 2 == 0))})
    first = compare_runs(a, b, seed=7)
    assert compare_runs(a, b, seed=7) == first
    m = first["benchmarks"]["medqa"]
    assert m["test"] == "paired bootstrap" and m["samples_per_item"] == {"a": 4, "b": 4}
    assert (m["accuracy_a"], m["accuracy_b"]) == (0.375, 0.5)
    assert m["difference"] == pytest.approx(0.125)
    lo, hi = m["ci95"]
    assert lo < 0.125 < hi
    se = 0.125 / math.sqrt(200)
    # Resampled means move in steps of 0.25 / 200, so the percentiles sit within a step of the
    # normal interval; a 90% interval (1.645 se) would miss by 0.003.
    assert lo == pytest.approx(0.125 - 1.96 * se, abs=0.0015)
    assert hi == pytest.approx(0.125 + 1.96 * se, abs=0.0015)
    # No resample can have a mean difference <= 0 (it would need no even item at all), so the
    # p-value is its floor: 2 * (0 + 1) / (10000 + 1).
    assert m["p_value"] == pytest.approx(2 / 10001)
    assert m["verdict"] == "B better"


def test_bootstrap_seed_changes_the_draws(tmp_path):
    a = _run(tmp_path, "a", {"medqa": _multi(60, lambda i: i % 5)})
    b = _run(tmp_path, "b", {"medqa": _multi(60, lambda i: (i * 7) % 5)})
    cis = {tuple(compare_runs(a, b, seed=s, n_boot=300)["benchmarks"]["medqa"]["ci95"]) for s in range(4)}
    assert len(cis) > 1


def test_bootstrap_null_case_is_no_significant_difference(tmp_path):
    # Per-item differences +0.25 and -0.25, half each: mean 0.
    a = _run(tmp_path, "a", {"medqa": _multi(100, lambda i: 2)})
    b = _run(tmp_path, "b", {"medqa": _multi(100, lambda i: 3 if i % 2 == 0 else 1)})
    m = compare_runs(a, b)["benchmarks"]["medqa"]
    assert m["difference"] == 0
    assert m["p_value"] > 0.5
    assert m["ci95"][0] < 0 < m["ci95"][1]
    assert m["verdict"] == "no significant difference"


def test_one_sample_against_several_uses_the_bootstrap(tmp_path):
    a = _run(tmp_path, "a", {"medqa": _multi(50, lambda i: 1, samples=1)})
    b = _run(tmp_path, "b", {"medqa": _multi(50, lambda i: 2)})
    m = compare_runs(a, b)["benchmarks"]["medqa"]
    assert m["test"] == "paired bootstrap" and m["samples_per_item"] == {"a": 1, "b": 4}
    assert (m["accuracy_a"], m["accuracy_b"]) == (1.0, 0.5)
    assert m["verdict"] == "A better"


def test_mismatched_ids_name_the_benchmark_runs_and_examples(tmp_path):
    ids_b = [f"q{i}" for i in range(38)] + ["x1", "x2"]
    a = _run(tmp_path, "a", {"medqa": _single(PAIRS, 0)})
    b = _run(tmp_path, "b", {"medqa": _single(PAIRS, 1, ids_b)})
    with pytest.raises(GazalError) as exc:
        compare_runs(a, b)
    msg = str(exc.value)
    assert "medqa" in msg and str(a) in msg and str(b) in msg
    assert "2 id(s) only in A" in msg and "q38" in msg and "q39" in msg
    assert "2 id(s) only in B" in msg and "x1" in msg and "x2" in msg


def test_benchmark_in_one_run_is_skipped_with_the_reason(tmp_path):
    a = _run(tmp_path, "a", {"medqa": _single(PAIRS, 0), "pubmedqa": _single(PAIRS, 0)})
    b = _run(tmp_path, "b", {"medqa": _single(PAIRS, 1)},
             results={"medqa": {}, "pubmedqa": {"skipped": "pubmedqa_test.jsonl not found"}})
    res = compare_runs(a, b)
    assert res["benchmarks"]["medqa"]["verdict"] == "B better"
    skipped = res["benchmarks"]["pubmedqa"]
    assert set(skipped) == {"skipped"}
    assert "only in run A" in skipped["skipped"] and "pubmedqa_test.jsonl not found" in skipped["skipped"]


def test_missing_eval_folder_and_missing_mode_are_clear_errors(tmp_path):
    a, b = _pair_runs(tmp_path)
    (tmp_path / "bare").mkdir()
    with pytest.raises(GazalError, match="no eval/ folder"):
        compare_runs(a, tmp_path / "bare")
    with pytest.raises(GazalError, match="no direct samples"):
        compare_runs(a, b, mode="direct")
    with pytest.raises(GazalError, match="unknown evaluation mode"):
        compare_runs(a, b, mode="fast")


def test_direct_mode_reads_its_own_folder(tmp_path):
    a, b = _pair_runs(tmp_path)  # reasoning rows: B better
    flipped = [(y, x) for x, y in PAIRS]
    _run(tmp_path, "a", {"medqa": _single(flipped, 0)}, mode_dir="direct")
    _run(tmp_path, "b", {"medqa": _single(flipped, 1)}, mode_dir="direct")
    assert compare_runs(a, b)["benchmarks"]["medqa"]["verdict"] == "B better"
    direct = compare_runs(a, b, mode="direct")["benchmarks"]["medqa"]
    assert (direct["accuracy_a"], direct["accuracy_b"], direct["verdict"]) == (0.75, 0.55, "A better")


def test_torn_last_line_is_ignored_and_the_run_is_not_touched(tmp_path):
    a, b = _pair_runs(tmp_path)
    path = a / "eval" / "medqa" / "samples.jsonl"
    path.write_text(path.read_text() + '{"id": "q40", "sam')
    before = path.read_bytes()
    m = compare_runs(a, b)["benchmarks"]["medqa"]
    assert m["n"] == 40 and m["p_value"] == pytest.approx(158 / 4096)
    assert path.read_bytes() == before


def test_a_complete_row_without_its_newline_is_unfinished(tmp_path):
    # A kill between the JSON and its newline: the row is not finished (and q40 is in no pair).
    a, b = _pair_runs(tmp_path)
    path = a / "eval" / "medqa" / "samples.jsonl"
    path.write_text(path.read_text() + json.dumps(_row("q40", 0, True)))
    assert compare_runs(a, b)["benchmarks"]["medqa"]["n"] == 40


def test_a_row_without_correct_names_the_file_and_line(tmp_path):
    a, b = _pair_runs(tmp_path)
    path = b / "eval" / "medqa" / "samples.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = json.dumps({"id": "q2", "sample": 0}) + "\n"
    path.write_text("".join(lines))
    with pytest.raises(GazalError, match=r"samples\.jsonl:3: .*'correct'"):
        compare_runs(a, b)


def test_cli_prints_one_line_per_benchmark_and_writes_json(tmp_path, capsys):
    a = _run(tmp_path, "a", {"medqa": _single(PAIRS, 0), "pubmedqa": _single(PAIRS, 0)})
    b = _run(tmp_path, "b", {"medqa": _single(PAIRS, 1)})
    out = tmp_path / "cmp.json"
    assert main(["compare", str(a), str(b), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    lo, hi = _hand_newcombe(20, 2, 10, 8)
    line = next(x for x in printed.splitlines() if x.startswith("medqa:"))
    assert line == (f"medqa: n=40, A 55.0%, B 75.0%, B-A +20.0 pts (95% CI {100 * lo:+.1f} to {100 * hi:+.1f}), "
                    f"exact McNemar p=0.0386: B better")
    assert "  step1: n=20" in printed
    assert any(x.startswith("pubmedqa: skipped: only in run A") for x in printed.splitlines())
    saved = json.loads(out.read_text())
    assert saved["benchmarks"]["medqa"]["p_value"] == pytest.approx(158 / 4096)
    assert saved["benchmarks"]["pubmedqa"].keys() == {"skipped"}


def test_cli_exit_code_2_on_mismatch_and_bad_dir(tmp_path, capsys):
    a = _run(tmp_path, "a", {"medqa": _single(PAIRS, 0)})
    b = _run(tmp_path, "b", {"medqa": _single(PAIRS[:30], 1)})
    assert main(["compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: medqa:") and "10 id(s) only in A" in err
    assert main(["compare", str(a), str(tmp_path / "nowhere")]) == 2
    assert "no eval/ folder" in capsys.readouterr().err
