"""The one answer extractor: evaluation scores with it and the GRPO accuracy reward pays with it.

Hand-written on purpose: lm-evaluation-harness and open-r1/math-verify extractors take the first
"answer is" anywhere (including inside the reasoning) or count unparseable output generously;
Gazal's rules are strict so a model cannot farm credit by hedging or by answering inside <think>.

Rules, in order:
1. If the completion contains </think>, only the text after the last </think> is read; a <think>
   that is never closed means no answer (truncated reasoning).
2. An explicit answer statement ("the answer is", "Answer:", "Final answer", \\boxed{}, a line
   holding only the label) wins over labels merely mentioned; the last statement wins.
3. Option text maps to its letter, longest exact match first ("Vitamin B12" is not "Vitamin B1").
4. Two or more different options in the final statement is a hedge: no answer.
5. A letter that is not one of the options is no answer (status not_an_option).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

OK = "ok"
NO_ANSWER = "no_answer"
HEDGE = "hedge"
NOT_AN_OPTION = "not_an_option"
STATUSES = (OK, NO_ANSWER, HEDGE, NOT_AN_OPTION)

YES_NO_MAYBE = ("yes", "no", "maybe")


@dataclass(frozen=True)
class Extraction:
    """What the completion answered: a label (or None) and why."""

    label: str | None
    status: str


# "The (final/correct) answer is", "Answer:", "Final answer -", "correct option is" ...
_STATEMENT = re.compile(
    r"(?:\b(?:final|correct|best|right)\s+(?:answer|option|choice)\b(?:\s+is)?"
    r"|\banswer\s+is\b|\banswer\b\s*(?=[:\-])|\boption\s+is\b|\bchoice\s+is\b)"
    r"\s*(?:\*\*)?\s*[:\-]?\s*",
    re.IGNORECASE,
)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_MARKUP = re.compile(r"[*_`$]|\\text\{|\\textbf\{|[{}]")
_CONNECTOR = re.compile(r"^\s*(?:,|/|&|\bor\b|\band\b|\band/or\b)\s*", re.IGNORECASE)


def split_reasoning(completion: str) -> str | None:
    """The text after the reasoning block, or None if a <think> was never closed."""
    if "</think>" in completion:
        return completion.rsplit("</think>", 1)[1]
    if "<think>" in completion:
        return None
    return completion


def _label_pattern(label: str, lettered: bool) -> str:
    if lettered:
        # A capital letter standing alone, optionally in brackets: "B", "(B)", "B)", "B.", "[B]".
        return rf"(?<![A-Za-z0-9]){re.escape(label)}(?![A-Za-z0-9])"
    return rf"\b{re.escape(label)}\b"


def _clean(text: str) -> str:
    return " ".join(_MARKUP.sub(" ", text).split())


def _line_end(text: str, pos: int) -> int:
    end = text.find("\n", pos)
    return len(text) if end < 0 else end


def _statements(text: str, labels: Sequence[str], lettered: bool) -> list[tuple[int, int, str]]:
    """Explicit answer statements as (start, end of its line, the text that states the answer)."""
    found: list[tuple[int, int, str]] = []
    for m in _STATEMENT.finditer(text):
        end = _line_end(text, m.end())
        found.append((m.start(), end, text[m.end():end]))
    for m in _BOXED.finditer(text):
        found.append((m.start(), _line_end(text, m.end()), m.group(1)))
    # A line that holds only a label (with brackets, bold or a full stop around it).
    alt = "|".join(re.escape(lab) for lab in labels) if not lettered else "[A-Z]"
    flags = re.IGNORECASE if not lettered else 0
    line_only = re.compile(rf"^[ \t*_(\[]*({alt})[ \t*_)\].:]*$", re.MULTILINE | flags)
    for m in line_only.finditer(text):
        found.append((m.start(), m.end(), m.group(1)))
    return sorted(found, key=lambda t: t[0])


@dataclass(frozen=True)
class Statement:
    """One explicit answer statement in the text after the reasoning."""

    start: int
    end: int
    extraction: Extraction


def answer_statements(
    answer_text: str, labels: Sequence[str], options: Mapping[str, str] | None = None
) -> list[Statement]:
    """Every explicit answer statement in `answer_text` (the part after </think>), read in order.

    The format reward uses this to demand exactly one clean final statement.
    """
    lettered = all(len(lab) == 1 and lab.isupper() for lab in labels)
    return [Statement(a, b, _read_statement(span, labels, options, lettered))
            for a, b, span in _statements(answer_text, labels, lettered)]


def _read_statement(
    span: str, labels: Sequence[str], options: Mapping[str, str] | None, lettered: bool
) -> Extraction:
    """Decide what one statement answers."""
    span = _clean(span)
    if not span:
        return Extraction(None, NO_ANSWER)
    flags = 0 if lettered else re.IGNORECASE
    canon = {lab.lower(): lab for lab in labels}
    lead = re.match(r"^[(\[]?\s*" + (r"([A-Z])" if lettered else r"([A-Za-z]+)") + r"(?![A-Za-z0-9])[)\].:]?", span,
                    flags)
    if lead and lettered and lead.group(1).lower() not in canon and re.match(r"\s+[a-z]", span[lead.end():]):
        lead = None  # "I think ...", "A patient ...": a pronoun or article, not a letter answer
    # The statement opens with a label: read it and any labels chained to it with or/and/commas.
    if lead and (lettered or lead.group(1).lower() in canon):
        chosen = [lead.group(1)]
        rest = span[lead.end():]
        while True:
            conn = _CONNECTOR.match(rest)
            if not conn:
                break
            nxt = re.match(r"[(\[]?\s*" + (r"([A-Z])" if lettered else r"([A-Za-z]+)") + r"(?![A-Za-z0-9])[)\]]?",
                           rest[conn.end():], flags)
            if not nxt or (not lettered and nxt.group(1).lower() not in canon):
                break
            chosen.append(nxt.group(1))
            rest = rest[conn.end() + nxt.end():]
        return _decide(chosen, labels)
    # Otherwise look for option texts (longest first, so "Vitamin B12" beats "Vitamin B1") and
    # for labels standing alone ("option C", "(C)").
    hits: list[str] = []
    remaining = span
    if options:
        for letter, text in sorted(options.items(), key=lambda kv: -len(kv[1])):
            t = _clean(text)
            if not t:
                continue
            pat = re.compile(rf"(?<![A-Za-z0-9]){re.escape(t)}(?![A-Za-z0-9])", re.IGNORECASE)
            if pat.search(remaining):
                hits.append(letter)
                remaining = pat.sub(" ", remaining)
    if lettered:
        hits += re.findall(r"(?:\boption\s+|\bchoice\s+|\(|\[)([A-Z])(?![A-Za-z0-9])", remaining)
        # Bare capitals that are labels, unless they read as an article or pronoun ("A patient") or
        # name something ("vitamin C", "hepatitis B"): only at the start, after punctuation, or after
        # a hedge word ("likely B") does a lone capital count as a letter.
        hits += re.findall(r"(?:^|[^A-Za-z0-9\s(\[]\s*|\b(?i:likely|probably|definitely|clearly|therefore|thus|so|is|be"
                           r"|think|believe|guess|choose|pick|select)\s+)"
                           r"([" + "".join(labels) + r"])(?![A-Za-z0-9])(?!\s+[a-z])", remaining)
    else:
        hits += [m.group(0) for m in re.finditer("|".join(_label_pattern(l, False) for l in labels), remaining,
                                                   re.IGNORECASE)]
    if not hits:
        return Extraction(None, NO_ANSWER)
    return _decide(hits, labels)


def _decide(chosen: Sequence[str], labels: Sequence[str]) -> Extraction:
    canon = {lab.lower(): lab for lab in labels}
    valid = {canon[c.lower()] for c in chosen if c.lower() in canon}
    if len(valid) > 1:
        return Extraction(None, HEDGE)
    if len(valid) == 1:
        return Extraction(valid.pop(), OK)
    return Extraction(None, NOT_AN_OPTION)


def extract_answer(
    completion: str, labels: Sequence[str], options: Mapping[str, str] | None = None
) -> Extraction:
    """Read the final answer of a completion.

    labels: the valid answers, e.g. ["A", "B", "C", "D"] or ["yes", "no", "maybe"].
    options: letter -> option text, so an answer given as text maps to its letter.
    """
    text = split_reasoning(completion)
    if text is None or not text.strip():
        return Extraction(None, NO_ANSWER)
    lettered = all(len(lab) == 1 and lab.isupper() for lab in labels)
    statements = _statements(text, labels, lettered)
    if statements:
        # The last explicit statement is the model's final word (a revised answer wins).
        return _read_statement(statements[-1][2], labels, options, lettered)
    # No explicit statement: read the last non-empty line as the answer.
    last = [line for line in text.splitlines() if line.strip()][-1]
    return _read_statement(last, labels, options, lettered)


def is_correct(extraction: Extraction, gold: str) -> bool:
    """Credit only for a clean answer equal to the gold label."""
    return extraction.status == OK and extraction.label is not None and extraction.label.lower() == gold.lower()
