"""How many optimizer steps SFT will take, estimated before launch from the size of its data.

`sft.save_steps` and `sft.eval_steps` count optimizer steps, but a recipe's author sees examples: with
`sft.packing` several examples share one `sft.max_length` row, so a run has far fewer steps than
examples / batch, and a save or eval interval chosen from the example count can exceed the whole run
(no checkpoint to resume from, no evaluation loss). `gazal validate` and `gazal plan` warn then.

The arithmetic, as TRL's SFTTrainer and transformers' Trainer do it:
- examples: each source's training rows after its `limit`, the held-out `data.sft_validation_fraction`
  and its `weight` (as `gazal.data.load_sft_mixture`), at most `data.sft_limit` in all. Local files,
  seed sets and the PubMedQA pool are read and counted (nothing is downloaded); a hub source counts
  only when the recipe declares its size (`data.sft.N.rows`, and `mean_tokens` for packing).
- tokens of an example: its characters / CHARS_PER_TOKEN (or the tokenizer's own ratio, measured on
  a sample, when one is given) plus MESSAGE_TOKENS a message for the chat template. Examples longer
  than `sft.max_length` are dropped, as `gazal sft` drops them.
- rows: with packing, total tokens / max_length (TRL's best-fit-decreasing packing fills rows almost
  full, so this is a lower bound within a few percent); without, one row an example.
- steps: per epoch ceil(ceil(rows / processes) / per_device_train_batch_size) micro-batches, over
  gradient_accumulation_steps (rounded up), times num_train_epochs (rounded up); or sft.max_steps.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gazal.config import Recipe, SFTSource
from gazal.errors import GazalError

log = logging.getLogger(__name__)

# Assumptions when no tokenizer is given (gazal.plan counts prompts with them too): SmolLM2's
# tokenizer reads 3.9 characters a token on the bundled seed cases, so 3.5 errs towards more tokens;
# a template that adds a default system prompt adds more than 8 a message (SmolLM2's: 32 a conversation).
CHARS_PER_TOKEN = 3.5
MESSAGE_TOKENS = 8  # role markers and separators a chat template adds per message
TOKENIZER_SAMPLE = 256  # examples tokenized to measure the tokenizer's characters per token


@dataclass(frozen=True)
class SftSteps:
    """SFT's estimated size: examples, tokens, the rows the trainer sees, and optimizer steps."""

    examples: int
    tokens: float
    rows: int
    steps: int
    processes: int
    per_step: int  # rows per optimizer step: per_device_train_batch_size x processes x accumulation
    validation: int  # held-out examples (an evaluation loss needs some)
    sources: list[str] = field(default_factory=list)  # where each source's numbers came from

    def describe(self, recipe: Recipe) -> str:
        s = recipe.sft
        rows = (f"packed into {self.rows:,} rows of sft.max_length {s.max_length} (a lower bound: best-fit packing "
                f"leaves rows a few percent short)" if s.packing else
                f"{self.rows:,} rows, one an example (no packing)")
        total = f"{self.tokens / 1e6:,.1f}M" if self.tokens >= 1e6 else f"{self.tokens:,.0f}"
        run = (f"sft.max_steps {s.max_steps}" if s.max_steps > 0 else
               f"{s.num_train_epochs:g} epoch(s) of rows / ({s.per_device_train_batch_size} a device x "
               f"{self.processes} process(es) x {s.gradient_accumulation_steps} accumulated = {self.per_step})")
        mean = self.tokens / max(self.examples, 1)
        return (f"~{self.steps:,} optimizer steps: {self.examples:,} training examples x ~{mean:,.0f} tokens = "
                f"{total} tokens, {rows}; {run}; from {'; '.join(self.sources)}")


def _text(row: dict[str, Any], system_prompt: str | None) -> str:
    """The text of an SFT example's messages, as `gazal.sft.to_chat` builds them."""
    if "messages" in row:
        body = "".join(m["content"] for m in row["messages"])
        return (system_prompt or "") + body if row["messages"][0]["role"] != "system" else body
    return f"{system_prompt or ''}{row['case']}<think>\n{row['reasoning'].strip()}\n</think>\n{row['answer'].strip()}"


def _messages(row: dict[str, Any], system_prompt: str | None) -> int:
    if "messages" in row:
        return len(row["messages"]) + (1 if system_prompt and row["messages"][0]["role"] != "system" else 0)
    return 2 + (1 if system_prompt else 0)


def _chars_per_token(samples: list[str], tokenizer) -> float:
    if tokenizer is None or not samples:
        return CHARS_PER_TOKEN
    tokens = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in samples)
    return sum(len(t) for t in samples) / max(tokens, 1)


def _local_rows(source: SFTSource, recipe: Recipe) -> tuple[list[tuple[int, int]], list[str], int] | None:
    """If the source is on this machine (seed set, local file, PubMedQA pool): each row's
    (characters, messages), the first TOKENIZER_SAMPLE rows' texts, and the examples its own
    validation folds hold out (the pool's); None when it is not here. A file is read in one
    streaming pass, so a large one costs a pair of numbers a row, not its rows."""
    from gazal import data, pubmedqa

    prompt = recipe.task.system_prompt
    held = 0
    if pubmedqa.is_pool(source.path):
        items = pubmedqa.load_pool(source.path, recipe)
        rows = iter([pubmedqa.sft_row(it, recipe) for it in pubmedqa.stage_items(source.path, recipe, "sft", items)])
        held = len(pubmedqa.stage_items(source.path, recipe, "validation", items))
    elif source.path in data.SEEDS or Path(source.path).expanduser().is_file():
        columns = {**data.HUB_SFT_PRESETS.get(source.path, {}), **source.columns}
        rows = (data.sft_example(row, where, columns) for where, row in data.read_rows(data._resolve(source.path)))
    else:
        return None
    sizes, sample = [], []
    for row in rows:
        text = _text(row, prompt)
        sizes.append((len(text), _messages(row, prompt)))
        if len(sample) < TOKENIZER_SAMPLE:
            sample.append(text)
        if source.limit and len(sizes) == source.limit:
            break
    return sizes, sample, held


def _weighted(n: int, weight: float) -> int:
    """Rows a source of n rows contributes at `weight` (as gazal.data.load_sft_mixture)."""
    whole = int(weight)
    return n * whole + round((weight - whole) * n)


def _held_out(n: int, fraction: float) -> int:
    n_val = round(n * fraction)
    return 1 if fraction and n_val == 0 and n > 1 else n_val


def _hub_size(key: str, source: SFTSource, recipe: Recipe) -> tuple[int, int, float, str] | str:
    """(training examples, held-out examples, tokens, how) of a source not on this machine, from its
    declared size; or why there is none."""
    s, d = recipe.sft, recipe.data
    if source.rows is None:
        return (f"{key} ({source.path}) is not on this machine and its size is not declared "
                f"({key}.rows{', ' + key + '.mean_tokens' if s.packing else ''})")
    if s.packing and source.mean_tokens is None:
        return f"{key} ({source.path}): with sft.packing the estimate needs {key}.mean_tokens"
    n = min(source.rows, source.limit) if source.limit else source.rows
    n_val = _held_out(n, d.sft_validation_fraction)
    train = _weighted(n - n_val, source.weight)
    per = source.mean_tokens or 0
    return train, n_val, train * per, (f"{source.path}: {source.rows:,} rows{f' x ~{per:,} tokens' if per else ''} "
                                       f"declared in the recipe ({key})")


def estimate(recipe: Recipe, processes: int, tokenizer=None) -> tuple[SftSteps | None, str]:
    """SFT's step estimate for a launch of `processes` processes, or None and why it cannot be made
    here. Never raises: a source that cannot be read leaves the estimate out."""
    s, d = recipe.sft, recipe.data
    examples, tokens, validation, sources = 0.0, 0.0, 0, []
    local: list[tuple[SFTSource, list[tuple[int, int]]]] = []
    samples: list[str] = []
    for i, source in enumerate(d.sft):
        key = f"data.sft.{i}"
        try:
            found = _local_rows(source, recipe)
        except (GazalError, OSError, ValueError) as exc:  # a broken file is `gazal sft`'s to report, row by row
            return None, f"{key} ({source.path}) could not be read here: {exc}"
        if found is not None:
            local.append((source, found[0]))
            samples += found[1]
            validation += found[2]
            continue
        size = _hub_size(key, source, recipe)
        if isinstance(size, str):
            return None, size
        train, n_val, n_tokens, how = size
        examples, validation, tokens = examples + train, validation + n_val, tokens + n_tokens
        sources.append(how)
    if local:
        ratio = _chars_per_token(samples, tokenizer)
        how = "the tokenizer's" if tokenizer is not None else "assumed"
        for source, rows in local:
            # Tokens of each example; those over max_length are dropped before training (gazal.sft).
            lengths = [chars / ratio + messages * MESSAGE_TOKENS + 1 for chars, messages in rows]  # + 1: TRL's EOS
            kept = [n for n in lengths if n <= s.max_length]
            n_val = _held_out(len(rows), d.sft_validation_fraction)
            # Held-out rows are a random share: the kept rows' mean stands for the training rows.
            train = _weighted(round((len(rows) - n_val) * len(kept) / len(rows)), source.weight)
            examples, validation = examples + train, validation + n_val
            tokens += train * (sum(kept) / len(kept) if kept else 0)
            sources.append(f"{source.path}: {len(rows):,} rows counted here ({len(rows) - len(kept)} over "
                           f"sft.max_length), {ratio:.2f} characters a token ({how})")
    if d.sft_limit and examples > d.sft_limit:
        tokens *= d.sft_limit / examples
        examples = d.sft_limit
    if examples < 1:
        return None, "data.sft: no training examples fit sft.max_length"
    rows_seen = math.ceil(tokens / s.max_length) if s.packing else int(examples)
    per_device = s.per_device_train_batch_size
    micro = math.ceil(math.ceil(rows_seen / processes) / per_device)
    per_epoch = max(math.ceil(micro / s.gradient_accumulation_steps), 1)
    steps = s.max_steps if s.max_steps > 0 else math.ceil(s.num_train_epochs * per_epoch)
    return SftSteps(examples=int(examples), tokens=tokens, rows=rows_seen, steps=steps, processes=processes,
                    per_step=per_device * processes * s.gradient_accumulation_steps, validation=validation,
                    sources=sources), ""


def interval_warnings(recipe: Recipe, est: SftSteps) -> list[tuple[tuple[str, ...], str]]:
    """(key, message) for each of sft.save_steps and sft.eval_steps that exceeds the estimated steps."""
    s = recipe.sft
    out = []
    where = f"{est.processes} process(es)"
    suggest = max(est.steps // 5, 1)
    if s.save_steps and s.save_steps > est.steps:
        out.append((("sft", "save_steps"), f"sft.save_steps={s.save_steps} exceeds the ~{est.steps} optimizer steps "
                    f"SFT is estimated to take on {where}: the run would write no checkpoint to --resume from; set "
                    f"sft.save_steps to at most {est.steps} (e.g. {suggest}: a few checkpoints)"))
    if s.eval_steps and est.validation and s.eval_steps > est.steps:
        out.append((("sft", "eval_steps"), f"sft.eval_steps={s.eval_steps} exceeds the ~{est.steps} optimizer steps "
                    f"SFT is estimated to take on {where}: the run would compute no evaluation loss; set "
                    f"sft.eval_steps to at most {est.steps} (e.g. {suggest})"))
    return out


def check_intervals(recipe: Recipe, processes: int) -> list[tuple[tuple[str, ...], str]]:
    """What `gazal validate` warns about: the save and eval intervals against the estimated steps
    (nothing when SFT is off, has no interval to check, or its data's size is not known here)."""
    s = recipe.sft
    if not s.enabled or not (s.save_steps or s.eval_steps):
        return []
    est, why = estimate(recipe, processes)
    if est is None:
        log.debug("sft step estimate skipped: %s", why)
        return []
    return interval_warnings(recipe, est)
