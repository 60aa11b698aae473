"""`gazal data synth`: SFT examples from a teacher behind an OpenAI-compatible chat endpoint.

Seeds (category x specialty x care setting x patient profile x complexity) are drawn in a fixed
order from the recipe seed, and each item's key is derived from its seed, so a rerun skips what is
done and a killed run resumes without duplicates. Items are appended to items.jsonl as they finish;
responses that are not well-formed examples are recorded in failures.jsonl and asked again; an
item that exhausts its attempts is recorded there as final. manifest.json (counts, tokens, cost)
is written last. The OpenAI client does the transport retries (exponential backoff on timeouts,
429 and 5xx); the API key comes from the environment and is never written anywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import random
import re
import string
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tqdm.auto import tqdm

from gazal import rundir
from gazal.config import Recipe, SynthSettings
from gazal.errors import GazalError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Seed:
    """What one example is about; its key names it across runs."""

    index: int
    category: str
    specialty: str
    care_setting: str
    patient_profile: str
    complexity: str

    @property
    def key(self) -> str:
        text = "|".join([self.category, self.specialty, self.care_setting, self.patient_profile, self.complexity,
                         str(self.index)])
        return hashlib.sha1(text.encode()).hexdigest()[:16]


def seeds(cfg: SynthSettings, seed: int) -> list[Seed]:
    """num_items seeds: every combination once in a seeded order, then again (next index) if more are asked."""
    combos = list(itertools.product(cfg.categories, cfg.specialties, cfg.care_settings, cfg.patient_profiles,
                                    cfg.complexities))
    random.Random(seed).shuffle(combos)
    return [Seed(i // len(combos), *combos[i % len(combos)]) for i in range(cfg.num_items)]


def load_templates(cfg: SynthSettings) -> dict[str, string.Template]:
    """One prompt template per category ($specialty, $care_setting, $patient_profile, $complexity)."""
    folder = Path(cfg.templates_dir) if cfg.templates_dir else Path(str(resources.files("gazal") / "templates" / "synth"))
    out = {}
    for category in cfg.categories:
        path = folder / f"{category}.txt"
        if not path.is_file():
            raise GazalError(f"synth.templates_dir: no template {path} for category '{category}'")
        out[category] = string.Template(path.read_text(encoding="utf-8"))
    return out


_SECTION = re.compile(r"^\s*(CASE|REASONING|ANSWER)\s*:\s*$", re.MULTILINE)


def parse_example(text: str) -> dict[str, str]:
    """The teacher's CASE / REASONING / ANSWER sections; ValueError saying what is wrong."""
    parts = _SECTION.split(text or "")
    sections = {parts[i]: parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}
    missing = [name for name in ("CASE", "REASONING", "ANSWER") if not sections.get(name)]
    if missing:
        raise ValueError(f"missing or empty section(s): {', '.join(missing)}")
    if not re.search(r"(?m)^\s*1[.)]\s+\S", sections["REASONING"]):
        raise ValueError("reasoning has no numbered steps")
    return {"case": sections["CASE"], "reasoning": sections["REASONING"], "answer": sections["ANSWER"]}


def _done(path: Path, final_only: bool = False) -> set[str]:
    """Keys recorded in an items or failures file (with final_only, only final failures)."""
    return {row["key"] for row in rundir.finished_rows(path) if not final_only or row.get("final")}


class Synthesizer:
    """Runs the teacher over the seeds that are not done yet, writing as it goes."""

    def __init__(self, cfg: SynthSettings, seed: int, out: Path):
        self.cfg, self.out = cfg, out
        self.templates = load_templates(cfg)
        self.todo = seeds(cfg, seed)
        self.tokens = {"prompt": 0, "completion": 0}
        self.stats = {"ok": 0, "failed": 0, "malformed_responses": 0, "request_errors": 0}

    def _client(self):
        from openai import AsyncOpenAI

        # A local server needs no key; the client insists on a string, so an empty one is sent.
        key = os.environ.get(self.cfg.api_key_env) or "EMPTY"
        return AsyncOpenAI(base_url=self.cfg.base_url, api_key=key, max_retries=self.cfg.max_retries,
                           timeout=self.cfg.timeout_s)

    def _write(self, name: str, row: dict) -> None:
        with (self.out / name).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    async def _one(self, client, s: Seed, sem: asyncio.Semaphore, bar) -> None:
        prompt = self.templates[s.category].safe_substitute(
            specialty=s.specialty, care_setting=s.care_setting, patient_profile=s.patient_profile,
            complexity=s.complexity)
        attempts = self.cfg.malformed_retries + 1
        async with sem:
            for attempt in range(1, attempts + 1):
                final = attempt == attempts
                try:
                    resp = await client.chat.completions.create(
                        model=self.cfg.model, messages=[{"role": "user", "content": prompt}],
                        temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens)
                    if resp.usage is not None:
                        self.tokens["prompt"] += resp.usage.prompt_tokens
                        self.tokens["completion"] += resp.usage.completion_tokens
                    text = resp.choices[0].message.content if resp.choices else None
                except Exception as exc:  # transport failures after the client's own retries, bad bodies
                    self.stats["request_errors"] += 1
                    self._write("failures.jsonl", {"key": s.key, "attempt": attempt, "final": final,
                                                   "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                    continue
                try:
                    example = parse_example(text)
                except ValueError as exc:
                    self.stats["malformed_responses"] += 1
                    self._write("failures.jsonl", {"key": s.key, "attempt": attempt, "final": final,
                                                   "error": f"malformed: {exc}", "response": (text or "")[:2000]})
                    continue
                self._write("items.jsonl", {"key": s.key, "id": f"synth-{s.key}", "category": s.category,
                                            "specialty": s.specialty, "care_setting": s.care_setting,
                                            "patient_profile": s.patient_profile, "complexity": s.complexity,
                                            **example, "model": self.cfg.model, "attempts": attempt})
                self.stats["ok"] += 1
                bar.update(1)
                return
        self.stats["failed"] += 1
        bar.update(1)

    async def run(self) -> dict:
        done = _done(self.out / "items.jsonl") | _done(self.out / "failures.jsonl", final_only=True)
        todo = [s for s in self.todo if s.key not in done]
        if len(todo) < len(self.todo):
            log.info("synth: resuming, %d of %d items already done", len(self.todo) - len(todo), len(self.todo))
        sem = asyncio.Semaphore(self.cfg.concurrency)
        client = self._client()
        with tqdm(total=len(self.todo), initial=len(self.todo) - len(todo), desc="synth", unit="item") as bar:
            await asyncio.gather(*(self._one(client, s, sem, bar) for s in todo))
        await client.close()
        return self.stats


def main(recipe: Recipe, out_dir: Path | None = None) -> dict:
    """Generate the recipe's synth items into out_dir (default synth.output_dir); returns the manifest."""
    cfg = recipe.synth
    out = Path(out_dir or cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # written last: its presence means the run finished
    start = time.time()
    synth = Synthesizer(cfg, recipe.seed, out)
    stats = asyncio.run(synth.run())
    items = len(_done(out / "items.jsonl"))
    failed = len(_done(out / "failures.jsonl", final_only=True) - _done(out / "items.jsonl"))
    cost = (synth.tokens["prompt"] * cfg.price_per_1k_prompt_tokens
            + synth.tokens["completion"] * cfg.price_per_1k_completion_tokens) / 1000
    manifest = {"requested": cfg.num_items, "items": items, "failed": failed, "this_run": stats,
                "tokens_this_run": synth.tokens, "cost_this_run": round(cost, 6), "seconds_this_run": round(time.time() - start, 1),
                "model": cfg.model, "base_url": cfg.base_url, "seed": recipe.seed,
                "settings": cfg.model_dump(mode="json", exclude={"api_key_env"})}
    rundir.write_json(out / "manifest.json", manifest)
    return manifest
