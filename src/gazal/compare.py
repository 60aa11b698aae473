"""Paired comparison of two evaluated runs: is run B better than run A, or is the gap noise?

Both runs answered the same items, so the comparison is paired by item id: each item's score is
the mean of `correct` over its samples, and the test looks at how the two runs differ item by
item, not at two accuracies as if they came from different questions.

- One sample per item in both runs: the exact McNemar test on the discordant items, and
  Newcombe's method-10 interval for the difference of paired proportions.
- Several samples per item (in either run): a seeded paired bootstrap over items for both the
  interval and the p-value.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from collections import defaultdict
from pathlib import Path

from gazal import manifest, rundir
from gazal.errors import GazalError
from gazal.scoring import wilson_interval

log = logging.getLogger(__name__)

# Where each evaluation mode keeps its rows, relative to RUN/eval/<benchmark>/.
MODES = {"reasoning": Path("samples.jsonl"), "direct": Path("direct") / "samples.jsonl"}
ALPHA = 0.05
Z95 = 1.96  # the z that scoring.wilson_interval uses for its 95% intervals
MCNEMAR = "exact McNemar"
BOOTSTRAP = "paired bootstrap"


def mcnemar_p(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of a_only vs b_only discordant items at 1/2.

    a_only: items run A got right and run B wrong; b_only: the reverse. No discordant items: 1.
    """
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    try:
        from scipy.stats import binomtest
    except ImportError:
        # scipy is not a dependency of gazal (it arrives with datasketch in most installs). The
        # exact tail is a short sum of integers: P = min(1, 2 * sum_{i<=k} C(n, i) / 2^n), which
        # for p = 1/2 is what scipy's two-sided binomtest computes. Python divides big ints exactly
        # rounded, so this stays exact for any n.
        return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    return float(binomtest(k, n, 0.5, alternative="two-sided").pvalue)


def newcombe_paired_interval(both: int, a_only: int, b_only: int, neither: int, z: float = Z95) -> tuple[float, float]:
    """95% interval for accuracy B - accuracy A on paired 0/1 outcomes: Newcombe's method 10.

    Newcombe RG (1998), "Improved confidence intervals for the difference between binomial
    proportions based on paired data", Statistics in Medicine 17:2635-2650, method 10, in the form
    of Altman et al., "Statistics with Confidence" (2nd ed., 2000), ch. 6, and Fagerland, Lydersen
    & Laake (2017), "Statistical Analysis of Contingency Tables", sect. 8.5 ("square-and-add"):

        pA = (both + a_only) / n, pB = (both + b_only) / n, D = pB - pA
        (lA, uA), (lB, uB): Wilson score intervals (no continuity correction) for pA and pB
        x = both * neither - a_only * b_only
        phi = (x - n/2) / sqrt(mA (n - mA) mB (n - mB))  if x > n/2,
              0                                          if 0 <= x <= n/2,
              x / sqrt(...)                              if x < 0,
              0 when any margin is 0  (mA, mB: items A, B got right)
        lower = D - sqrt((pB - lB)^2 - 2 phi (pB - lB)(uA - pA) + (uA - pA)^2)
        upper = D + sqrt((uB - pB)^2 - 2 phi (uB - pB)(pA - lA) + (pA - lA)^2)

    clipped to [-1, 1].
    """
    n = both + a_only + b_only + neither
    if n == 0:
        return (0.0, 0.0)
    right_a, right_b = both + a_only, both + b_only
    p_a, p_b = right_a / n, right_b / n
    l_a, u_a = wilson_interval(right_a, n, z)
    l_b, u_b = wilson_interval(right_b, n, z)
    margins = right_a * (n - right_a) * right_b * (n - right_b)
    x = both * neither - a_only * b_only
    if margins == 0 or 0 <= x <= n / 2:
        phi = 0.0
    else:
        phi = (x - n / 2 if x > n / 2 else x) / math.sqrt(margins)
    d = p_b - p_a
    lower = d - math.sqrt(max(0.0, (p_b - l_b) ** 2 - 2 * phi * (p_b - l_b) * (u_a - p_a) + (u_a - p_a) ** 2))
    upper = d + math.sqrt(max(0.0, (u_b - p_b) ** 2 - 2 * phi * (u_b - p_b) * (p_a - l_a) + (p_a - l_a) ** 2))
    return (max(-1.0, lower), min(1.0, upper))


def paired_bootstrap(scores_a: list[float], scores_b: list[float], seed: int = 0,
                     n_boot: int = 10000) -> tuple[tuple[float, float], float]:
    """Percentile 95% interval and two-sided p-value for mean(B - A), resampling items with replacement.

    The p-value inverts the percentile interval (Efron & Tibshirani, "An Introduction to the
    Bootstrap", 1993, sect. 15.4): p = min(1, 2 * min(1 + #{D* <= 0}, 1 + #{D* >= 0}) / (n_boot + 1)),
    where D* are the resampled mean differences; so p < 0.05 goes with an interval that excludes 0.
    The same seed and inputs give the same result.
    """
    import numpy as np  # a dependency of transformers and datasets, so always installed

    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, not {n_boot}")
    diff = np.asarray(scores_b, dtype=np.float64) - np.asarray(scores_a, dtype=np.float64)
    n = len(diff)
    if n == 0:
        return (0.0, 0.0), 1.0
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // n)  # bounds memory: chunk x n indices at a time
    means = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        means[start:start + k] = diff[rng.integers(0, n, size=(k, n))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    below, above = int((means <= 0).sum()), int((means >= 0).sum())
    p = min(1.0, 2 * min(below + 1, above + 1) / (n_boot + 1))
    return (float(lo), float(hi)), p


def _read_rows(path: Path) -> list[dict]:
    """The finished rows of a samples file, read without touching it.

    Same tolerance as rundir.finished_rows (rows stop at the first unterminated or unparsable
    line, which a killed evaluation leaves), but finished_rows also rewrites the file to drop
    that line; a comparison must not write into a run, least of all one whose evaluation is still
    appending to it (the rewrite would replace the file under the writer's open handle).
    """
    rows: list[dict] = []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for lineno, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if row is None or not line.endswith("\n"):
            log.warning("%s: reading the first %d lines; line %d is unfinished", path, lineno - 1, lineno)
            break
        if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("correct"), bool):
            raise GazalError(f"{path}:{lineno}: a samples row needs an 'id' and a true/false 'correct'")
        rows.append(row)
    return rows


def eval_folder(run: Path) -> Path:
    """Where a run's evaluation is: RUN/eval, or the folder itself when it is an evaluation folder
    (RUN/eval, or one stage's RUN/eval/stages/<stage> of the stage report card)."""
    return run if (run / "results.json").is_file() and not (run / "eval").is_dir() else run / "eval"


def _results(run: Path) -> dict:
    path = eval_folder(run) / "results.json"
    if not path.is_file():
        return {}
    try:
        data = rundir.read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GazalError(f"{path}: not valid JSON ({exc})") from exc
    return data.get("benchmarks", {}) if isinstance(data, dict) else {}


def _benchmarks(run: Path, mode: str) -> dict[str, list[dict]]:
    """Each benchmark of the run with rows in this mode: name -> rows."""
    folder = eval_folder(run)
    if not folder.is_dir():
        raise GazalError(f"{run}: no eval/ folder (not an evaluated run directory; run `gazal eval --run-dir {run}`)")
    found = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        path = sub / MODES[mode]
        if path.is_file():
            rows = _read_rows(path)
            if rows:
                found[sub.name] = rows
    if not found:
        raise GazalError(f"{folder}: no {mode} samples (no <benchmark>/{MODES[mode].as_posix()} with finished rows)")
    return found


def _sources(run: Path) -> dict[str, dict]:
    """The benchmark sources the run's manifest recorded (manifest.eval_benchmarks; {} for a run
    without one), after checking that those files still have their recorded hashes (GazalError
    naming the file and both hashes otherwise: the rows were scored against the recorded data).
    `run` is a run directory, its eval/ folder, or one stage's folder of the card."""
    folder = eval_folder(run)
    root = folder.parent if folder.name == "eval" else folder.parents[2] if folder.parent.name == "stages" else None
    if root is None:
        return {}
    manifest.verify_benchmarks(root)
    return manifest.eval_benchmarks(root)


def _same_data(name: str, source_a: dict, source_b: dict, run_a: Path, run_b: Path) -> str | None:
    """The benchmark file's sha256 both runs recorded (None where either did not record one);
    GazalError when they differ: the same ids would then be other questions or other labels."""
    a, b = source_a.get("sha256"), source_b.get("sha256")
    if a and b and a != b:
        raise GazalError(f"{name}: the runs evaluated different benchmark data, so their items cannot be paired: "
                         f"A ({run_a}) read {source_a.get('path') or source_a.get('hub_id')} (sha256 {a}), B ({run_b}) "
                         f"read {source_b.get('path') or source_b.get('hub_id')} (sha256 {b}); evaluate both on the "
                         "same files")
    return a if a and b else None


def _same_predictions(rows_a: list[dict], rows_b: list[dict]) -> dict | None:
    """How many (item, sample) answers are the same in both runs: a re-run (`gazal reproduce`) that
    agrees gives every one. None when rows lack predictions or the samples differ."""
    def answers(rows):
        return {(r["id"], r.get("sample", 0)): r.get("prediction") for r in rows}

    a, b = answers(rows_a), answers(rows_b)
    if a.keys() != b.keys() or any("prediction" not in r for r in (*rows_a, *rows_b)):
        return None
    return {"same": sum(a[k] == b[k] for k in a), "of": len(a)}


def _per_item(rows: list[dict]) -> tuple[dict, dict, int]:
    """Item id -> mean of correct over its samples, item id -> category, and the most samples of any item.

    Like scoring.metrics, every row counts, so the accuracies equal those in results.json.
    """
    hits: dict = defaultdict(list)
    category: dict = {}
    for r in rows:
        hits[r["id"]].append(r["correct"])
        category.setdefault(r["id"], r.get("category"))
    return {i: sum(v) / len(v) for i, v in hits.items()}, category, max(len(v) for v in hits.values())


def _skip_reason(name: str, lacking: Path, label: str, mode: str, results: dict) -> str:
    """Why a benchmark is compared in neither direction: run `label` (at `lacking`) has no rows for it."""
    other = "B" if label == "A" else "A"
    reason = f"only in run {other}: {lacking}/eval/{name}/{MODES[mode].as_posix()} is missing or empty"
    entry = results.get(name)
    if isinstance(entry, dict) and "skipped" in entry:
        reason += f" (run {label} skipped it: {entry['skipped']})"
    return reason


def verdict(difference: float, p_value: float, alpha: float = ALPHA) -> str:
    """'B better', 'A better' or 'no significant difference' at level alpha."""
    if p_value >= alpha or difference == 0:
        return "no significant difference"
    return "B better" if difference > 0 else "A better"


def compare_one(name: str, rows_a: list[dict], rows_b: list[dict], run_a: Path, run_b: Path,
                seed: int = 0, n_boot: int = 10000) -> dict:
    """One benchmark's paired comparison of two sets of evaluation rows (B - A); see compare_runs."""
    score_a, cat_a, k_a = _per_item(rows_a)
    score_b, cat_b, k_b = _per_item(rows_b)
    if score_a.keys() != score_b.keys():
        only_a = sorted(map(str, score_a.keys() - score_b.keys()))
        only_b = sorted(map(str, score_b.keys() - score_a.keys()))
        raise GazalError(
            f"{name}: the runs evaluated different items, so they cannot be paired: {len(only_a)} id(s) only in "
            f"A ({run_a}){': ' + ', '.join(only_a[:5]) if only_a else ''}; {len(only_b)} id(s) only in B ({run_b})"
            f"{': ' + ', '.join(only_b[:5]) if only_b else ''} (same benchmarks, eval.limit and categories?)")
    ids = sorted(score_a, key=str)
    a = [score_a[i] for i in ids]
    b = [score_b[i] for i in ids]
    n = len(ids)
    acc_a, acc_b = sum(a) / n, sum(b) / n
    out: dict = {"n": n, "samples_per_item": {"a": k_a, "b": k_b}, "accuracy_a": acc_a, "accuracy_b": acc_b,
                 "difference": acc_b - acc_a}
    if k_a == 1 and k_b == 1:
        both = sum(x == 1 and y == 1 for x, y in zip(a, b))
        a_only = sum(x == 1 and y == 0 for x, y in zip(a, b))
        b_only = sum(x == 0 and y == 1 for x, y in zip(a, b))
        neither = n - both - a_only - b_only
        p = mcnemar_p(a_only, b_only)
        out.update(test=MCNEMAR, p_value=p, ci95=list(newcombe_paired_interval(both, a_only, b_only, neither)),
                   ci95_method="Newcombe method 10",
                   table={"both": both, "a_only": a_only, "b_only": b_only, "neither": neither})
    else:
        # Each benchmark draws from its own stream, so adding a benchmark leaves the others' numbers alone.
        ci, p = paired_bootstrap(a, b, seed=seed + zlib.crc32(name.encode()), n_boot=n_boot)
        out.update(test=BOOTSTRAP, p_value=p, ci95=list(ci), ci95_method=f"percentile bootstrap, {n_boot} resamples",
                   seed=seed)
    out["verdict"] = verdict(out["difference"], p)
    out["same_predictions"] = _same_predictions(rows_a, rows_b)
    groups: dict[str, list[str]] = defaultdict(list)
    for i in ids:
        category = cat_a.get(i) or cat_b.get(i)
        if category:
            groups[category].append(i)
    out["per_category"] = {
        c: {"n": len(members), "accuracy_a": sum(score_a[i] for i in members) / len(members),
            "accuracy_b": sum(score_b[i] for i in members) / len(members),
            "difference": sum(score_b[i] - score_a[i] for i in members) / len(members)}
        for c, members in sorted(groups.items())}
    return out


def compare_runs(run_a: Path, run_b: Path, mode: str = "reasoning", seed: int = 0, n_boot: int = 10000) -> dict:
    """Compare run B with run A on every benchmark both evaluated in `mode`, paired by item id.

    Returns {"run_a", "run_b", "mode", "alpha", "benchmarks": {name: entry}, "benchmark_sha256"}; an entry has n,
    samples_per_item, accuracy_a, accuracy_b, difference (B - A), ci95 and ci95_method, test,
    p_value, verdict and per_category, or only "skipped" (a reason) for a benchmark in one run.
    Each compared entry also says how many answers are the same in both runs (same_predictions);
    "benchmark_sha256" holds, per compared benchmark, the file hash both runs' manifests recorded
    (None where either recorded none).
    Raises GazalError for a run without eval/ or without rows in this mode, for a benchmark whose
    item ids differ between the runs, and for one whose recorded benchmark hashes differ.
    """
    if mode not in MODES:
        raise GazalError(f"unknown evaluation mode {mode!r}: expected one of {', '.join(MODES)}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, not {n_boot}")
    run_a, run_b = Path(run_a), Path(run_b)
    found_a, found_b = _benchmarks(run_a, mode), _benchmarks(run_b, mode)
    results_a, results_b = _results(run_a), _results(run_b)
    sources_a, sources_b = _sources(run_a), _sources(run_b)
    # Benchmarks in the order the runs list them, then any others by name.
    names = list(dict.fromkeys([*results_a, *results_b, *sorted({*found_a, *found_b})]))
    benchmarks: dict[str, dict] = {}
    data: dict[str, str | None] = {}
    for name in names:
        if name in found_a and name in found_b:
            data[name] = _same_data(name, sources_a.get(name, {}), sources_b.get(name, {}), run_a, run_b)
            entry = compare_one(name, found_a[name], found_b[name], run_a, run_b, seed, n_boot)
            log.info("%s: A %.3f, B %.3f, %s p=%.3g: %s", name, entry["accuracy_a"], entry["accuracy_b"],
                     entry["test"], entry["p_value"], entry["verdict"])
        elif name in found_a:
            entry = {"skipped": _skip_reason(name, run_b, "B", mode, results_b)}
        elif name in found_b:
            entry = {"skipped": _skip_reason(name, run_a, "A", mode, results_a)}
        else:
            continue  # listed in results.json (e.g. skipped) but evaluated in neither run
        benchmarks[name] = entry
    return {"run_a": str(run_a), "run_b": str(run_b), "mode": mode, "alpha": ALPHA, "benchmarks": benchmarks,
            "benchmark_sha256": data}
