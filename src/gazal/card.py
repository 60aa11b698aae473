"""The stage report card: every evaluated stage's model side by side on the same items, and what each
stage changed, item by item, with its interval and paired test (Gazal-R1's ablation table).

Built from the stages' evaluation rows by the evaluation stage (eval/results.json: "card"); the
report renders it. The paired comparisons are `gazal compare`'s own (`compare.compare_one`), so the
card and `gazal compare RUN/eval/stages/A RUN/eval` give the same numbers.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from gazal.compare import compare_one

STAGE_TITLES = {"base": "base model", "sft": "after SFT", "grpo": "after GRPO"}


def pairs(stages: list[str]) -> list[tuple[str, str]]:
    """Consecutive stages, then the first against the last when they are not consecutive."""
    out = list(zip(stages, stages[1:]))
    if len(stages) > 2:
        out.append((stages[0], stages[-1]))
    return out


def confusion(rows: list[dict]) -> dict[str, dict[str, int]]:
    """gold label -> predicted label ('none' when no answer was extracted) -> count."""
    table: dict[str, Counter] = {}
    for r in rows:
        table.setdefault(r["answer"], Counter())[r["prediction"] or "none"] += 1
    return {gold: dict(sorted(c.items())) for gold, c in sorted(table.items())}


def majority(rows: list[dict]) -> dict:
    """What always answering the commonest gold label would score on these items (PubMedQA test:
    always 'yes' scores 55.2%): a model below it has not learned even the label prior."""
    golds = Counter(r["answer"] for r in {r["id"]: r for r in rows}.values())
    label, count = golds.most_common(1)[0]
    return {"label": label, "accuracy": count / sum(golds.values())}


def summary(metrics: dict, rows: list[dict], direct: dict | None) -> dict:
    """One stage's cell for one benchmark."""
    out = {"n": metrics["n"], "accuracy": metrics["accuracy"], "ci95": metrics["ci95"],
           "answered_rate": metrics["status_rates"]["ok"], "format_rate": metrics.get("format_rate"),
           "mean_completion_tokens": metrics["mean_completion_tokens"], "truncation_rate": metrics["truncation_rate"],
           "confusion": confusion(rows)}
    if direct is not None:
        out["direct"] = {"accuracy": direct["accuracy"], "ci95": direct["ci95"],
                         "answered_rate": direct["status_rates"]["ok"]}
    return out


def build(stages: list[str], folders: dict[str, Path], results: dict[str, dict], rows: dict[str, dict[str, dict]],
          direct_method: str | None) -> dict:
    """The card from each stage's results.json entries and rows.

    results[stage]: that stage's results ("benchmarks": name -> metrics); rows[stage][benchmark][mode]:
    its merged rows. Benchmarks skipped in any stage are left out of the comparisons."""
    card: dict = {"stages": stages, "models": {s: results[s]["model"] for s in stages},
                  "folders": {s: str(folders[s]) for s in stages}, "direct_method": direct_method,
                  "comparison_pairs": [list(p) for p in pairs(stages)], "benchmarks": {}}
    for name in results[stages[-1]]["benchmarks"]:
        entries = [results[s]["benchmarks"].get(name, {}) for s in stages]
        if any("skipped" in e or not e for e in entries):
            continue
        reasoning = {s: rows[s][name]["reasoning"] for s in stages if "reasoning" in rows[s][name]}
        bench: dict = {"stages": {}, "comparisons": []}
        for s, e in zip(stages, entries):
            bench["stages"][s] = summary(e, rows[s][name].get("reasoning", []), e.get("direct"))
        if reasoning:
            bench["majority_label"] = majority(next(iter(reasoning.values())))
        for a, b in pairs(stages):
            for mode in ("reasoning", "direct"):
                if mode in rows[a][name] and mode in rows[b][name]:
                    entry = compare_one(name, rows[a][name][mode], rows[b][name][mode], folders[a], folders[b])
                    bench["comparisons"].append({"a": a, "b": b, "mode": mode, **entry})
        card["benchmarks"][name] = bench
    return card


STAGE_HEADER = ["stage", "items", "accuracy % (95% CI)", "answered %", "format %", "mean tokens", "truncated %",
                "direct % (95% CI)"]
PAIR_HEADER = ["comparison", "mode", "items", "accuracy A → B %", "B − A, points (95% CI)", "test", "p", "verdict"]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _ci(value: float, ci: list[float]) -> str:
    return f"{_pct(value)} ({_pct(ci[0])}-{_pct(ci[1])})"


def tables(card: dict) -> dict[str, dict[str, list]]:
    """The card as cells, for report.md and report.html alike: per benchmark, one row per stage, one
    row per paired comparison, and notes (majority-label reference, confusion per stage)."""
    out = {}
    for name, bench in card["benchmarks"].items():
        stage_rows = []
        for s, c in bench["stages"].items():
            direct = c.get("direct")
            stage_rows.append([STAGE_TITLES.get(s, s), str(c["n"]), _ci(c["accuracy"], c["ci95"]),
                               _pct(c["answered_rate"]), _pct(c["format_rate"]),
                               "-" if c["mean_completion_tokens"] is None else f"{c['mean_completion_tokens']:.0f}",
                               _pct(c["truncation_rate"]), _ci(direct["accuracy"], direct["ci95"]) if direct else "-"])
        pair_rows = []
        for p in bench["comparisons"]:
            lo, hi = p["ci95"]
            pair_rows.append([f"{p['a']} → {p['b']}", p["mode"], str(p["n"]),
                              f"{_pct(p['accuracy_a'])} → {_pct(p['accuracy_b'])}",
                              f"{100 * p['difference']:+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f})", p["test"],
                              f"{p['p_value']:.3g}", p["verdict"]])
        notes = []
        if "majority_label" in bench:
            m = bench["majority_label"]
            notes.append(f"always answering the commonest label, '{m['label']}', scores {_pct(m['accuracy'])}% "
                         "on these items")
        for s, c in bench["stages"].items():
            notes.append(f"{STAGE_TITLES.get(s, s)}, gold → predicted: " + "; ".join(
                f"{gold} → " + ", ".join(f"{p} {k}" for p, k in preds.items()) for gold, preds in c["confusion"].items()))
        out[name] = {"stages": stage_rows, "comparisons": pair_rows, "notes": notes}
    return out
