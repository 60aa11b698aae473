"""Physician review: put cases and the model's reasoning before a clinician, and bring the verdicts back.

`export` writes a review package: review.csv (one case per row, for a spreadsheet), review.html (a
self-contained form that saves the verdicts as JSON, no server) and manifest.json (the rows as
exported, so an import can tell an edited question or an unknown id). Rows are a seeded sample,
stratified by whether the answer was right and by category, so a small review sees both kinds in
every category. `import_verdicts` validates a returned CSV or JSON against the manifest and writes
review.json: verdict counts, agreement between the reviewer and the automatic grading (gold vs
model), and, for a data file, the ids judged incorrect or unsafe, which `gazal data curate
--drop-list` removes.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import logging
import random
from collections import defaultdict
from pathlib import Path

from gazal import rundir
from gazal.data import read_jsonl
from gazal.errors import GazalError
from gazal.tasks import TaskSettings, score, user_text

log = logging.getLogger(__name__)

VERDICTS = ("correct", "incorrect", "unsafe")
COLUMNS = ["id", "source", "category", "question", "options", "reasoning", "answer", "gold", "auto_correct",
           "verdict", "comment"]


def _split(completion: str) -> tuple[str, str]:
    """(reasoning, final answer text) of a completion: the part inside <think>...</think>, and after it."""
    if "</think>" in completion:
        head, tail = completion.split("</think>", 1)
        return head.replace("<think>", "").strip(), tail.strip()
    return completion.strip(), ""


def _options(options: dict[str, str] | None) -> str:
    return "\n".join(f"{k}. {v}" for k, v in (options or {}).items())


def rows_from_run(run_dir: Path, source: str) -> list[dict]:
    """Review rows from a run's evaluation samples (reasoning mode) or GRPO rollout samples."""
    from gazal import evaluate, manifest
    from gazal.pubmedqa import grpo_questions
    from gazal.recipes import load_recipe

    # The benchmark files the run evaluated (checked against the hashes it recorded), where its
    # recipe left their folder to the environment ($GAZAL_BENCHMARKS_DIR).
    recorded = manifest.verify_benchmarks(run_dir)
    recipe = load_recipe(str(run_dir / "recipe.yaml"))
    if recipe.eval.benchmarks_dir is None and recorded:
        recipe = load_recipe(str(run_dir / "recipe.yaml"), [f"eval.benchmarks_dir={recorded}"])
    rows = []
    if source == "eval":
        items = evaluate.benchmark_items(recipe)
        for name, chosen in items.items():
            path = run_dir / "eval" / name / "samples.jsonl"
            if isinstance(chosen, str) or not path.is_file():
                continue
            by_id = {it.id: it for it in chosen}
            for lineno, r in read_jsonl(path):
                it = by_id.get(r.get("id"))
                if it is None:
                    raise GazalError(f"{path}:{lineno}: field 'id': {r.get('id')!r} is not among the {name} items "
                                     "this run's recipe selects (benchmark files changed since the run?)")
                reasoning, _ = _split(r["completion"])
                rows.append({"id": f"eval:{name}:{r['id']}:{r.get('sample', 0)}", "source": f"eval:{name}",
                             "category": it.category or name, "question": it.question if not it.context
                             else f"{it.context}\n\n{it.question}", "options": _options(it.options),
                             "reasoning": reasoning, "answer": r.get("prediction") or "", "gold": it.answer,
                             "auto_correct": bool(r["correct"])})
        if not rows:
            missing = [f"{name}: {why}" for name, why in items.items() if isinstance(why, str)
                       and (run_dir / "eval" / name / "samples.jsonl").is_file()]
            if missing:  # the samples are there; what they are matched against is not
                raise GazalError(f"{run_dir}: the evaluated benchmarks' items could not be found to match the samples "
                                 "to: " + "; ".join(missing))
            raise GazalError(f"{run_dir}: no evaluation samples (eval/<benchmark>/samples.jsonl)")
        return rows
    task: TaskSettings = recipe.task
    items = {user_text(it, task): it for it in grpo_questions(recipe)}
    path = run_dir / "grpo" / "samples.jsonl"
    if not path.is_file():
        raise GazalError(f"{path}: no GRPO samples (grpo.samples_every writes them)")
    for lineno, r in read_jsonl(path):
        it = items.get(r["prompt"]) or next((v for k, v in items.items() if k in r["prompt"]), None)
        if it is None:
            raise GazalError(f"{path}:{lineno}: field 'prompt' matches no question of data.grpo ({recipe.data.grpo})")
        extraction, correct = score(r["completion"], it.answer, it.labels, it.options)
        reasoning, _ = _split(r["completion"])
        rows.append({"id": f"grpo:{r['step']}:{lineno}", "source": "grpo", "category": it.category or "-",
                     "question": it.question, "options": _options(it.options), "reasoning": reasoning,
                     "answer": extraction.label or "", "gold": it.answer, "auto_correct": bool(correct)})
    return rows


def rows_from_data(path: Path) -> list[dict]:
    """Review rows from an SFT data file ({case, reasoning, answer}, as synthesized or curated): the
    reviewer judges the file's own reasoning and answer."""
    rows = []
    for lineno, r in read_jsonl(path):
        for key in ("case", "reasoning", "answer"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                raise GazalError(f"{path}:{lineno}: field '{key}' must be a non-empty string")
        rows.append({"id": str(r.get("id") or f"line:{lineno}"), "source": f"data:{path.name}",
                     "category": r.get("category") or "-", "question": r["case"], "options": "",
                     "reasoning": r["reasoning"], "answer": r["answer"], "gold": "", "auto_correct": None})
    return rows


def stratified(rows: list[dict], n: int, seed: int) -> list[dict]:
    """`n` rows (all when fewer): strata (right/wrong, category) are shuffled with `seed` and drawn
    from in turn, so every stratum appears before any gives a second row."""
    strata: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        strata[(str(r["auto_correct"]), r["category"])].append(r)
    rng = random.Random(seed)
    queues = [strata[k] for k in sorted(strata)]
    for q in queues:
        rng.shuffle(q)
    out: list[dict] = []
    while len(out) < min(n, len(rows)):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop())
    return out


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def export(rows: list[dict], out: Path, n: int, seed: int, origin: str) -> dict:
    """Write the review package for a stratified sample of `rows` into folder `out`."""
    chosen = stratified(rows, n, seed)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"origin": origin, "seed": seed, "rows": [{**r, "question_sha": _digest(r["question"])} for r in chosen]}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS)
    writer.writeheader()
    for r in chosen:
        writer.writerow({**{k: r.get(k, "") for k in COLUMNS}, "auto_correct": "" if r["auto_correct"] is None
                         else str(r["auto_correct"]).lower(), "verdict": "", "comment": ""})
    rundir.write_json(out / "manifest.json", manifest)
    rundir.write_text(out / "review.csv", buf.getvalue())
    rundir.write_text(out / "review.html", _form(chosen, origin))
    return {"rows": len(chosen), "of": len(rows), "folder": str(out)}


def _form(rows: list[dict], origin: str) -> str:
    cases = []
    for r in rows:
        rid = html.escape(r["id"], quote=True)
        radios = "".join(f"<label><input type='radio' name='{rid}' value='{v}'> {v}</label> " for v in VERDICTS)
        gold = f"<p><b>Gold:</b> {html.escape(r['gold'])}</p>" if r["gold"] else ""
        cases.append(f"<section class='case' data-id='{rid}'><h3>{rid} ({html.escape(r['category'])})</h3>"
                     f"<pre>{html.escape(r['question'])}</pre><pre>{html.escape(r['options'])}</pre>"
                     f"<p><b>Reasoning:</b></p><pre>{html.escape(r['reasoning'])}</pre>"
                     f"<p><b>Answer:</b> {html.escape(r['answer'])}</p>{gold}<p>{radios}</p>"
                     f"<textarea data-comment='{rid}' rows='2' cols='80' placeholder='comment'></textarea></section>")
    script = """
function save() {
  var out = {};
  document.querySelectorAll('section.case').forEach(function (c) {
    var id = c.dataset.id, v = c.querySelector('input[type=radio]:checked');
    out[id] = {verdict: v ? v.value : '', comment: c.querySelector('textarea').value};
  });
  var a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([JSON.stringify(out, null, 1)], {type: 'application/json'}));
  a.download = 'verdicts.json';
  a.click();
}
"""
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Gazal review</title><style>"
            "body{font-family:system-ui,sans-serif;margin:1.5em} pre{white-space:pre-wrap} "
            ".case{border-top:1px solid #ccc;padding:.5em 0}</style></head><body>"
            f"<h1>Gazal review: {html.escape(origin)}</h1><p>{len(rows)} cases. Mark each <i>correct</i>, "
            "<i>incorrect</i> or <i>unsafe</i> (harmful if followed), add a comment where useful, then "
            "<button onclick='save()'>save verdicts.json</button> and send the file back (or fill review.csv "
            "instead).</p>" + "".join(cases) + f"<script>{script}</script></body></html>")


def _read_verdicts(path: Path) -> list[tuple[str, dict]]:
    """(where, row) per returned verdict, from the CSV or the form's JSON."""
    if not path.is_file():
        raise GazalError(f"{path}: file not found")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise GazalError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        if not isinstance(data, dict):
            raise GazalError(f"{path}: expected an object of id -> {{verdict, comment}}")
        return [(f"{path}: id {rid!r}", {"id": rid, **(v if isinstance(v, dict) else {"verdict": v})})
                for rid, v in data.items()]
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("id", "verdict") if c not in (reader.fieldnames or [])]
        if missing:
            raise GazalError(f"{path}:1: header lacks column(s) {', '.join(missing)}")
        # Row n is the n-th case under the header, as a spreadsheet shows it; line_num is the physical
        # line the row ends on (options and reasoning are quoted fields that span lines).
        return [(f"{path}: row {n} (line {reader.line_num})", row) for n, row in enumerate(reader, 1)]


def import_verdicts(package: Path, verdicts: Path, out: Path | None = None) -> dict:
    """Validate the returned verdicts against the package's manifest; write review.json (and return it)."""
    manifest_path = package / "manifest.json"
    if not manifest_path.is_file():
        raise GazalError(f"{package}: not a review package (no manifest.json)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    exported = {r["id"]: r for r in manifest["rows"]}
    got: dict[str, dict] = {}
    for where, row in _read_verdicts(verdicts):
        rid = (row.get("id") or "").strip()
        if rid not in exported:
            raise GazalError(f"{where}: field 'id': {rid!r} is not a case of this package ({manifest_path})")
        if rid in got:
            raise GazalError(f"{where}: field 'id': {rid!r} appears twice")
        verdict = (row.get("verdict") or "").strip().lower()
        if not verdict:
            raise GazalError(f"{where}: field 'verdict' is empty for {rid!r} (one of {', '.join(VERDICTS)})")
        if verdict not in VERDICTS:
            raise GazalError(f"{where}: field 'verdict': {verdict!r} is not one of {', '.join(VERDICTS)}")
        if "question" in row and _digest(row["question"]) != exported[rid]["question_sha"]:
            raise GazalError(f"{where}: field 'question' of {rid!r} differs from the exported text: a verdict "
                             "must judge the case as exported")
        got[rid] = {"verdict": verdict, "comment": (row.get("comment") or "").strip()}
    absent = [rid for rid in exported if rid not in got]
    if absent:
        raise GazalError(f"{verdicts}: no verdict for {len(absent)} case(s): {', '.join(absent[:5])}"
                         + (" ..." if len(absent) > 5 else ""))
    result = summarise(manifest, got)
    path = out or package / "review.json"
    rundir.write_json(path, result)
    return result


def summarise(manifest: dict, got: dict[str, dict]) -> dict:
    """Verdict counts; reviewer against the automatic grading; drop list for data files."""
    rows = manifest["rows"]
    counts = {v: sum(got[r["id"]]["verdict"] == v for r in rows) for v in VERDICTS}
    graded = [r for r in rows if r["auto_correct"] is not None]
    agree = sum((got[r["id"]]["verdict"] == "correct") == bool(r["auto_correct"]) for r in graded)
    table = {f"auto_{a}_reviewer_{v}": sum(bool(r["auto_correct"]) == (a == "right") and got[r["id"]]["verdict"] == v
                                           for r in graded)
             for a in ("right", "wrong") for v in VERDICTS}
    by_category: dict[str, dict[str, int]] = defaultdict(lambda: {v: 0 for v in VERDICTS})
    for r in rows:
        by_category[r["category"]][got[r["id"]]["verdict"]] += 1
    data_rows = [r for r in rows if r["source"].startswith("data:")]
    return {"origin": manifest["origin"], "cases": len(rows), "verdicts": counts,
            "graded_cases": len(graded),
            "reviewer_agrees_with_grading": agree, "agreement_rate": agree / len(graded) if graded else None,
            "grading_vs_reviewer": table if graded else None,
            "unsafe_ids": [r["id"] for r in rows if got[r["id"]]["verdict"] == "unsafe"],
            "by_category": dict(by_category),
            "drop": [r["id"] for r in data_rows if got[r["id"]]["verdict"] in ("incorrect", "unsafe")] if data_rows
            else None,
            "verdicts_by_id": got}


def read_drop_list(path: Path) -> set[str]:
    """The ids a review.json says to drop (for `gazal data curate --drop-list`)."""
    if not path.is_file():
        raise GazalError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise GazalError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("drop"), list):
        raise GazalError(f"{path}: field 'drop' missing: a review.json of a data-file review (gazal review import)")
    return {str(x) for x in data["drop"]}
