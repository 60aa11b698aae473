"""The report stage: reads a run directory, writes report.md and report.html (see report_html). It never
trains or generates."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from gazal import card, manifest, report_html, rundir
from gazal.benchmarks import TITLES
from gazal.errors import GazalError
from gazal.monitor import read_metrics

log = logging.getLogger(__name__)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _stage_section(run_dir: Path, stage: str) -> list[str]:
    folder = run_dir / stage
    title = {"sft": "SFT (DoRA + rsLoRA)", "grpo": "GRPO"}[stage]
    # A stage the monitor stopped is unfinished but has a summary worth reporting.
    if not rundir.is_done(run_dir, stage) and not (folder / "summary.json").is_file():
        return [f"## {title}", "", "Not run (or not finished).", ""]
    s = rundir.read_json(folder / "summary.json")
    p = s["parameters"]
    lines = [f"## {title}", "",
             f"- started from `{s['base_model']}`",
             f"- {s.get('examples', s.get('questions'))} training rows, {s['steps']} steps, {s['seconds']} s, "
             f"mean train loss {s['train_loss']:.4f}, peak memory {s.get('peak_rss_mb', 0):.0f} MiB",
             f"- adapter: {p['trainable_parameters']:,} trainable parameters; "
             f"{p['trainable_tensors_changed']}/{p['trainable_tensors']} adapter tensors changed, "
             f"{p['frozen_tensors_changed']}/{p['frozen_tensors']} base tensors changed"]
    if s.get("dropped_overlong") or s.get("validation_examples"):
        lines.append(f"- {s.get('dropped_overlong', 0)} rows dropped as longer than max_length; "
                     f"{s.get('validation_examples', 0)} held out" +
                     (f", final eval loss {s['eval_loss']:.4f}" if s.get("eval_loss") is not None else ""))
    for source, o in (s.get("test_overlap") or {}).items():
        lines.append(f"- {source} against the test set ({o['test_source']}): {len(o['shared_ids'])} shared ids; "
                     f"{o['items_sharing_an_ngram']} of {o['training_items']} training items share a word "
                     f"{o['ngram']}-gram with it, at most {100 * o['largest_shared_fraction']:.1f}% of an item's")
    f = s.get("difficulty_filter")
    if f:
        lines.append(f"- difficulty filter: {f['kept']} of {f['estimated']} questions kept ({f['too_easy']} too easy, "
                     f"{f['too_hard']} too hard at k={f['samples']}, {f['not_estimated']} not estimated); questions by "
                     "right answers: " + ", ".join(f"{c}: {n}" for c, n in f["by_correct"].items()))
    if s.get("resumed_from"):
        lines.append(f"- resumed from `{s['resumed_from']}`")
    events = read_metrics(folder / "events.jsonl")  # same JSON-lines shape
    if events:
        lines.append(f"- monitor: {len(events)} event(s): " + "; ".join(
            f"step {e['step']} {e['rule']} ({e['action']})" for e in events[:8]) + " (see events.jsonl)")
    if s.get("stopped_by_monitor"):
        lines.append(f"- **stopped by the monitor**: {s['stopped_by_monitor']['message']}")
    rows = read_metrics(folder / "metrics.jsonl")
    keys = [k for k in ("loss", "eval_loss", "reward") if any(k in r for r in rows)]
    keys += sorted({k for r in rows for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    if rows and keys:
        # One step's reward is a handful of sampled completions: the half means show a trend that
        # the first and last values alone would drown in noise.
        lines += ["", "| metric | first | last | mean, first half | mean, second half |", "|---|---|---|---|---|"]
        for k in keys:
            vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
            if vals:
                half = len(vals) // 2
                early, late = (f"{_mean(vals[:half]):.4f}", f"{_mean(vals[half:]):.4f}") if half else ("-", "-")
                lines.append(f"| {k} | {vals[0]:.4f} | {vals[-1]:.4f} | {early} | {late} |")
    return lines + [""]


def _mean(vals: list[float]) -> float:
    return sum(vals) / len(vals)


def _row(title: str, b: dict, paper: str) -> str:
    lo, hi = b["ci95"]
    rates = b["status_rates"]
    return (f"| {title} | {b['n']} | {_pct(b['accuracy'])} ({_pct(lo)}-{_pct(hi)}) | {paper} | "
            f"{_pct(rates['no_answer'])} | {_pct(rates['hedge'])} | {_pct(rates['not_an_option'])} | "
            f"{_pct(b['truncation_rate'])} | {b['mean_completion_tokens']:.0f} |")


def _selection(b: dict) -> str:
    sel = b.get("selection")
    if sel and sel.get("strategy") == "stratified":
        return f"; a sample of {len(sel['ids'])} items stratified by label and category (seed {sel['seed']})"
    return f"; first {b['limit']} items only" if b.get("limit") else ""


def eval_table(res: dict) -> list[str]:
    """Markdown table of evaluation results beside Gazal-R1's reported numbers, with definitions."""
    lines = ["| benchmark | items | accuracy % (95% CI) | Gazal-R1 paper % | no answer % | hedge % | "
             "not an option % | truncated % | mean tokens |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, b in res["benchmarks"].items():
        title = TITLES.get(name, name)
        paper = _pct(b["paper_accuracy"]) if b.get("paper_accuracy") is not None else "-"
        if "skipped" in b:
            lines.append(f"| {title} | - | skipped | {paper} | - | - | - | - | - |")
            notes.append(f"- {title}: skipped: {b['skipped']}")
            continue
        lines.append(_row(title + (f" ({b['mode']})" if "direct" in b or b.get("mode") == "direct" else ""), b, paper))
        if "direct" in b:
            lines.append(_row(f"{title} (direct)", b["direct"], "-"))
        definition = "" if b["definition"] == title else f": {b['definition']}"
        cats = ", ".join(f"{c} {_pct(v['accuracy'])}% (" + (f"{_pct(v['ci95'][0])}-{_pct(v['ci95'][1])}, " if "ci95" in v else "")
                         + f"n={v['n']})" for c, v in b.get("per_category", {}).items())
        notes.append(f"- {title}{definition}{_selection(b)}" + (f"; by category: {cats}" if cats else ""))
    return lines + ["", *notes]


def recall_table(res: dict) -> list[str]:
    """Recall (direct answers) against reasoning, item by item, and accuracy by reasoning length."""
    rows = {name: b for name, b in res["benchmarks"].items() if "recall_vs_reasoning" in b}
    if not rows:
        return []
    lines = ["| benchmark | direct % | reasoning % | reasoning fixed a wrong recall | reasoning broke a right recall "
             "| both right | both wrong |", "|---|---|---|---|---|---|---|"]
    lengths = ["", "Reasoning accuracy by completion length (tokens):", "",
               "| benchmark | " + " | ".join(x["tokens"] for x in next(iter(rows.values()))["recall_vs_reasoning"]["by_length"])
               + " |", "|---|" + "---|" * len(next(iter(rows.values()))["recall_vs_reasoning"]["by_length"])]
    for name, b in rows.items():
        r = b["recall_vs_reasoning"]
        lines.append(f"| {TITLES.get(name, name)} | {_pct(b['direct']['accuracy'])} | {_pct(b['accuracy'])} | "
                     f"{r['reasoning_fixed']} ({_pct(r['reasoning_fixed_rate'])}%) | "
                     f"{r['reasoning_broke']} ({_pct(r['reasoning_broke_rate'])}%) | {r['both_right']} | {r['both_wrong']} |")
        lengths.append(f"| {TITLES.get(name, name)} | " + " | ".join(
            f"{_pct(x['accuracy'])}% (n={x['n']})" if x["accuracy"] is not None else "- (n=0)" for x in r["by_length"]) + " |")
    return lines + lengths


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def card_section(res: dict) -> list[str]:
    """The stage report card: each stage's model on the same items, and each step's paired difference."""
    c = res.get("card")
    if not c:
        return []
    lines = ["## Stage report card", "",
             "Every stage's model on the same items with the same decoding (" + ", ".join(
                 f"{s}: `{m}`" for s, m in c["models"].items()) + "). Differences are paired item by item "
             "(exact McNemar test and Newcombe interval; a paired bootstrap with several samples per item), as "
             "`gazal compare` computes them. 'answered': the extractor found one valid answer; 'format': one "
             "<think> block, then one clean answer statement (the format reward's rule)."]
    if c.get("direct_method"):
        lines.append(f"Direct answers: {c['direct_method']}.")
    lines.append("")
    for name, t in card.tables(c).items():
        lines += [f"### {TITLES.get(name, name)}", "", *_md_table(card.STAGE_HEADER, t["stages"]), "",
                  *_md_table(card.PAIR_HEADER, t["comparisons"]), "", *(f"- {n}" for n in t["notes"]), ""]
    return lines


def _eval_section(run_dir: Path) -> list[str]:
    if not rundir.is_done(run_dir, "eval"):
        return ["## Evaluation", "", "Not run (or not finished).", ""]
    res = rundir.read_json(run_dir / "eval" / "results.json")
    lines = ["## Evaluation", "", f"Model: `{res['model']}`; decoding: {res['decoding']}", "", *eval_table(res), "",
             "The paper's numbers are Qwen3-32B after the full recipe on the full test sets; a limited run is a smoke "
             "test, not a comparison.", ""]
    recall = recall_table(res)
    if recall:
        lines += ["## Recall versus reasoning", "",
                  "The same questions answered at once ('direct': what the model recalls) and after reasoning, paired "
                  "item by item (each reasoning sample against the item's direct answer).", "", *recall, ""]
    return lines


def _source_line(made_from: dict) -> list[str]:
    """Gazal's commit, and where the run's inputs are listed with their hashes."""
    if not made_from:
        return []
    source = made_from["gazal"]
    commit = source["commit"]
    code = (f"commit {commit[:12]}{' (uncommitted changes)' if source['dirty'] else ''}" if commit
            else "not a git checkout")
    return [f"- code: gazal {source['version']}, {code}; data, weights and benchmarks with their sha256: "
            f"`{manifest.FILE}`"]


def main(run_dir: Path) -> Path:
    """Write run_dir/report.md and run_dir/report.html from what the stages left in the run directory."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise GazalError(f"{run_dir}: not a Gazal run directory (no recipe.yaml)")
    manifest.verify_benchmarks(run_dir)  # a report never shows scores against benchmark files that changed since
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    versions = manifest.run_packages(run_dir)
    lines = [f"# Gazal run: {recipe['name']}", "",
             f"- run directory: `{run_dir}`",
             f"- base model: `{recipe['model']['name_or_path']}`",
             "- libraries: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v and k != "platform"),
             *_source_line(manifest.read(run_dir)), ""]
    if rundir.is_done(run_dir, "eval"):
        lines += card_section(rundir.read_json(run_dir / "eval" / "results.json"))
    lines += _stage_section(run_dir, "sft")
    lines += _stage_section(run_dir, "grpo")
    lines += _eval_section(run_dir)
    path = run_dir / "report.md"
    rundir.write_text(path, "\n".join(lines))
    page = report_html.write(run_dir, recipe, versions)
    log.info("report written to %s and %s", path, page)
    return path
