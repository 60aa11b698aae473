"""`gazal data curate`: keep the examples worth training on, and say why each other one went.

In order: schema and format (an SFT row needs case, reasoning and answer; a multiple-choice row a
question, lettered options and a gold letter among them), length, exact duplicates, near duplicates
(MinHash over word 5-grams, datasketch), and decontamination against benchmark test sets: a row is
dropped when a large share of its word n-grams, or of one benchmark item's, is shared with that
item (the open-r1 / GPT-3 n-gram approach, with stems common to many benchmark items ignored so
"Which of the following is the most likely diagnosis?" matches nothing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from gazal import rundir
from gazal.benchmarks import LOCAL_FILES
from gazal.config import CurateSettings
from gazal.data import check_options, read_jsonl, require_str
from gazal.errors import GazalError

log = logging.getLogger(__name__)

REASONS = ("schema", "review_rejected", "too_short", "too_long", "exact_duplicate", "near_duplicate", "contaminated",
           "judge_rejected")
JUDGE_PROMPT = (
    "You are a physician checking teaching material. Below is a medical question or case and its stated final "
    "answer. Reply with exactly one word: CORRECT if the answer is medically correct for the question, "
    "INCORRECT otherwise.\n\n{text}\n\nStated answer: {answer}")
# A benchmark n-gram shared by more items than this is a question stem, not content.
_STEM_ITEMS = 3


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def ngram_hashes(text: str, n: int) -> set[int]:
    w = words(text)
    return {hash(tuple(w[i:i + n])) for i in range(len(w) - n + 1)}


def row_text(row: dict[str, Any]) -> str:
    """The content a row would teach, for duplicate and contamination checks."""
    if "question" in row:
        opts = row.get("options") if isinstance(row.get("options"), dict) else {}
        return "\n".join([str(row.get("question", "")), *map(str, opts.values())])
    return "\n".join(str(row.get(k, "")) for k in ("case", "reasoning", "answer"))


def check_row(row: dict[str, Any], where: str) -> str:
    """Schema and format of one row; GazalError naming the field. Returns the row's kind."""
    if "question" in row:
        require_str(row, "question", where)
        options = check_options(row, where)
        answer = require_str(row, "answer", where).strip()
        if answer not in options:
            raise GazalError(f"{where}: field 'answer' is {answer!r}, not one of the options {', '.join(options)}")
        return "mcq"
    for key in ("case", "reasoning", "answer"):
        require_str(row, key, where)
    return "sft"


class BenchmarkIndex:
    """Word n-grams of benchmark test items, mapped to the items that contain them."""

    def __init__(self, n: int):
        self.n = n
        self.owners: dict[int, list[int]] = defaultdict(list)
        self.items: list[tuple[str, int]] = []  # (id, number of n-grams)

    @classmethod
    def from_dir(cls, directory: Path, n: int) -> BenchmarkIndex:
        index = cls(n)
        files = [directory / f for f in LOCAL_FILES.values() if (directory / f).is_file()]
        if not files:
            raise GazalError(f"--benchmarks: no benchmark files ({', '.join(LOCAL_FILES.values())}) in {directory}")
        for path in files:
            for lineno, row in read_jsonl(path):
                text = "\n".join([str(row.get("question", "")), str(row.get("context", "")),
                                  *map(str, (row.get("options") or {}).values())])
                index.add(f"{path.name}:{lineno} ({row.get('id', '')})", text)
        log.info("decontamination index: %d benchmark items from %d files", len(index.items), len(files))
        return index

    def add(self, item_id: str, text: str) -> None:
        grams = ngram_hashes(text, self.n)
        k = len(self.items)
        self.items.append((item_id, len(grams)))
        for g in grams:
            owners = self.owners[g]
            if len(owners) <= _STEM_ITEMS:
                owners.append(k)

    def match(self, text: str) -> tuple[float, str | None]:
        """The largest overlap of `text` with one benchmark item, and that item."""
        grams = ngram_hashes(text, self.n)
        if not grams:
            return 0.0, None
        hits: Counter[int] = Counter()
        for g in grams:
            owners = self.owners.get(g)
            if owners and len(owners) <= _STEM_ITEMS:
                hits.update(owners)
        if not hits:
            return 0.0, None
        best, score = None, 0.0
        for k, count in hits.items():
            s = count / max(1, min(len(grams), self.items[k][1]))
            if s > score:
                best, score = k, s
        return score, self.items[best][0]


def make_judge(cfg: CurateSettings):
    """A function: prompt -> 'CORRECT', 'INCORRECT' or what else the judge said; None without a judge."""
    if not cfg.judge_base_url:
        return None
    import os

    from openai import OpenAI

    client = OpenAI(base_url=cfg.judge_base_url, api_key=os.environ.get(cfg.judge_api_key_env) or "EMPTY")

    def judge(prompt: str) -> str:
        resp = client.chat.completions.create(model=cfg.judge_model, messages=[{"role": "user", "content": prompt}],
                                              temperature=0, max_tokens=4)
        words_ = (resp.choices[0].message.content or "").strip().upper().split()
        return words_[0].strip(".,:;!") if words_ else ""

    return judge


def curate(rows: list[tuple[str, dict]], cfg: CurateSettings, index: BenchmarkIndex | None,
           judge=None, drops: set[str] | None = None) -> tuple[list[dict], dict]:
    """Rows to keep, and a report: counts per reason with a few examples each. `drops`: ids (or
    'line:N' for rows without one) that a physician review judged incorrect or unsafe."""
    from datasketch import MinHash, MinHashLSH

    unclear = 0

    kept: list[dict] = []
    dropped: dict[str, list[dict]] = {r: [] for r in REASONS}
    seen: set[str] = set()
    # LSH only proposes candidates, at a lower threshold so rows just above the real one are not missed;
    # each candidate is then checked against the threshold with its own MinHash.
    lsh = MinHashLSH(threshold=max(0.05, cfg.near_duplicate_threshold - 0.2), num_perm=128)
    hashes: dict[str, Any] = {}

    def drop(reason: str, where: str, row: dict, detail: str) -> None:
        dropped[reason].append({"where": where, "detail": detail, "id": row.get("id"),
                                "text": " ".join(row_text(row).split())[:200]})

    for where, row in tqdm(rows, desc="curate", unit="row"):
        try:
            kind = check_row(row, where)
        except GazalError as exc:
            drop("schema", where, row, str(exc).split(": ", 1)[-1])
            continue
        if drops and (str(row.get("id")) in drops or f"line:{where.rsplit(':', 1)[-1]}" in drops):
            drop("review_rejected", where, row, "judged incorrect or unsafe in review")
            continue
        text = row_text(row)
        core = row["question"] if kind == "mcq" else row["reasoning"]
        if len(core.strip()) < cfg.min_chars:
            drop("too_short", where, row, f"{len(core.strip())} characters < {cfg.min_chars}")
            continue
        if len(text) > cfg.max_chars:
            drop("too_long", where, row, f"{len(text)} characters > {cfg.max_chars}")
            continue
        digest = hashlib.sha1(" ".join(words(text)).encode()).hexdigest()
        if digest in seen:
            drop("exact_duplicate", where, row, "same words as an earlier row")
            continue
        w = words(text)
        mh = MinHash(num_perm=128, seed=1)
        for i in range(max(1, len(w) - 4)):
            mh.update(" ".join(w[i:i + 5]).encode())
        near = [k for k in lsh.query(mh) if mh.jaccard(hashes[k]) >= cfg.near_duplicate_threshold]
        if near:
            drop("near_duplicate", where, row, f"near duplicate of {near[0]} (~{mh.jaccard(hashes[near[0]]):.2f} Jaccard)")
            continue
        if index is not None:
            score, item = index.match(text)
            if score >= cfg.decontamination_threshold:
                drop("contaminated", where, row, f"{score:.0%} {index.n}-gram overlap with {item}")
                continue
        if judge is not None:
            answer = row["answer"] if kind == "sft" else f"{row['answer']}. {row['options'][row['answer']]}"
            verdict = judge(JUDGE_PROMPT.format(text=row.get("case") or row.get("question"), answer=answer))
            if verdict == "INCORRECT":
                drop("judge_rejected", where, row, "the judge called the answer incorrect")
                continue
            if verdict != "CORRECT":
                unclear += 1
        seen.add(digest)
        lsh.insert(where, mh)
        hashes[where] = mh
        kept.append(row)
    report = {"input": len(rows), "kept": len(kept), "dropped": {r: len(v) for r, v in dropped.items()},
              "examples": {r: v[:5] for r, v in dropped.items() if v}, "settings": cfg.model_dump(mode="json"),
              "benchmarks_checked": index is not None, "judge": cfg.judge_base_url is not None,
              "judge_unclear_kept": unclear}
    return kept, report


def report_markdown(report: dict, source: str) -> str:
    lines = [f"# Curation of {source}", "", f"{report['input']} rows in, {report['kept']} kept.", "",
             "| reason | dropped |", "|---|---|", *[f"| {r} | {n} |" for r, n in report["dropped"].items()]]
    if not report["benchmarks_checked"]:
        lines += ["", "No benchmark directory was given: decontamination was not checked."]
    for reason, examples in report["examples"].items():
        lines += ["", f"## {reason}", ""]
        lines += [f"- `{e['where']}`: {e['detail']}: {e['text']}" for e in examples]
    return "\n".join(lines) + "\n"


def main(path: Path, out: Path, cfg: CurateSettings, benchmarks: Path | None, drops: set[str] | None = None) -> dict:
    """Curate `path` into `out`, with out.report.json and out.report.md beside it."""
    rows = [(f"{path}:{lineno}", row) for lineno, row in read_jsonl(path)]  # a broken line stops here, nothing written
    index = BenchmarkIndex.from_dir(benchmarks, cfg.decontamination_ngram) if benchmarks else None
    kept, report = curate(rows, cfg, index, make_judge(cfg), drops)
    out.parent.mkdir(parents=True, exist_ok=True)
    rundir.write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    rundir.write_json(out.with_suffix(".report.json"), report)
    rundir.write_text(out.with_suffix(".report.md"), report_markdown(report, str(path)))
    return report
