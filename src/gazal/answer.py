"""The one answer extractor: evaluation scores with it and the GRPO accuracy reward pays with it.

Hand-written on purpose: lm-evaluation-harness and open-r1/math-verify extractors take the first
"answer is" anywhere (including inside the reasoning) or count unparseable output generously;
Gazal's rules are strict so a model cannot farm credit by hedging or by answering inside <think>.

Rules, in order:
1. If the completion contains </think>, only the text after the last </think> is read; a <think>
   that is never closed means no answer (truncated reasoning).
2. An explicit answer statement ("the answer is", "Answer:", "Final answer", \\boxed{}, a line
   holding only the label, or "Option B" / "Choice C" alone) wins over labels merely mentioned;
   the last statement wins.
3. Option text maps to its letter, longest exact match first ("Vitamin B12" is not "Vitamin B1").
4. Two or more different options in the final statement is a hedge: no answer.
5. A letter that is not one of the options is no answer (status not_an_option).
6. A capital letter that opens a sentence is prose, not a letter, when it stands bare before a
   lowercase word or a contraction, or has a full stop before an all-lowercase word ("E. coli"):
   "I would go with B" is B, "A patient with ..." is no letter. A word that explains an answer
   ("A because ...", "C is correct") keeps the letter, and so do brackets, a colon or a capital
   after the full stop: "(I) ...", "I) ...", "I. Nephrotic syndrome". This holds whether or not
   the letter is an option, since "I" and "A" are labels once a question has enough options.
7. On lettered questions a lowercase letter counts only in forms prose never uses: "(b)", "[b]",
   "b)", "b." opening the statement, "option b", a statement that is nothing but the letter
   ("answer: c", "**b**", "b or c"), or a letter closing it after a choosing word ("I'd go with
   b."). So "a beta blocker" is not A and "hepatitis b." is not B.
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

# Rule 6. Words that may follow a bare letter answer without making it prose ("A because the rash
# is vesicular", "C is correct", "B or C"). Any other lowercase word after a bare capital, or a
# contraction ("I'm", "I'd"), means the capital is an article or pronoun opening a sentence.
_EXPLAINS = r"(?:because|since|as|given|due|is|was|fits|explains|which|seems|or|and)\b"
_CONTRACTION = r"['’][a-z]"
_PROSE_AFTER = rf"(?:{_CONTRACTION}|\s+(?!{_EXPLAINS})[a-z])"
# With a full stop, only an all-lowercase word makes it prose: "E. coli", "S. aureus" are
# organisms, while "A. eGFR 38 ..." is the letter A followed by its explanation.
_GENUS_WORD = r"[a-z]+(?![A-Za-z0-9])"
# Text right after the letter that opens a statement and makes that letter prose.
_LEAD_PROSE = re.compile(rf"{_PROSE_AFTER}|\.\s+(?!{_EXPLAINS}){_GENUS_WORD}")
# The same for a capital found inside a statement; stricter (any lowercase word), since this also
# reads a last line that states nothing, where "37.3 °C or higher" must not be C.
_HIT_PROSE = rf"{_CONTRACTION}|\s+[a-z]|\.\s+{_GENUS_WORD}"
# Words after which a lone capital is a chosen letter ("likely B", "I would go with B").
_CHOOSERS = (r"(?i:likely|probably|definitely|clearly|therefore|thus|so|is|be|think|believe|guess"
             r"|choose|pick|select|with|say|option|choice|letter)")
# "Option B", "the choice (C)": the word only introduces the letter, so it is dropped before the
# letter is read (then "Option B or C" is a hedge like "B or C").
_OPTION_WORD = re.compile(r"^(?i:the\s+)?(?i:option|choice|letter)\s+(?=[(\[]?[A-Z](?![A-Za-z0-9]))")

# Rule 7: lowercase letters that can only be option letters, capitalised before reading.
_LOWER_ONLY_LETTERS = re.compile(  # the whole statement: "b", "(b).", "b or c"
    r"^[(\[]?[a-z][)\]]?(?:\s*(?:,|/|&|\b(?i:or|and/or|and)\b)\s*[(\[]?[a-z][)\]]?)*\s*[.:!]?$")
_LOWER_FORMS = [
    re.compile(r"(?<![A-Za-z0-9])[(\[]([a-z])[)\]]"),  # "(b)", "[b]"
    re.compile(r"(?<![A-Za-z0-9(\[])([a-z])\)"),  # "b)"
    re.compile(r"^([a-z])\.(?!\S)(?!\s+[a-z])"),  # "b." opening the statement: "b. Nephrotic ..."
    re.compile(rf"\b(?i:option|choice|letter)\s+[(\[]?([a-z])(?![A-Za-z0-9'’])(?!{_PROSE_AFTER})"),
    re.compile(rf"\b{_CHOOSERS}\s+([a-z])\s*[.!]?$"),  # closing: "I'd go with b."
]


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


def _lift_lowercase_letters(span: str) -> str:
    """Capitalise the lowercase letters that rule 7 reads as option letters ("(b)" -> "(B)").

    Only forms that prose never uses count, because a lone "a" is usually the article.
    """
    if _LOWER_ONLY_LETTERS.match(span):
        return span.upper()

    def capitalise_letter(m: re.Match[str]) -> str:  # group 1 is the letter; keep what surrounds it
        return m.string[m.start():m.start(1)] + m.group(1).upper() + m.string[m.end(1):m.end()]

    for form in _LOWER_FORMS:
        span = form.sub(capitalise_letter, span)
    return span


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
    # A line that holds only a label (with brackets, bold or a full stop around it); on lettered
    # questions also "Option B" / "Choice (C)" and a lowercase letter (rule 7: "b" alone is B).
    if lettered:
        alt = r"(?:(?i:option|choice|letter)\s+[(\[]?)?([A-Za-z])"
        flags = 0
    else:
        alt = "(" + "|".join(re.escape(lab) for lab in labels) + ")"
        flags = re.IGNORECASE
    line_only = re.compile(rf"^[ \t*_(\[]*{alt}[ \t*_)\].:]*$", re.MULTILINE | flags)
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
    if lettered:
        span = _OPTION_WORD.sub("", _lift_lowercase_letters(span))
    lead = re.match(r"^[(\[]?\s*" + (r"([A-Z])" if lettered else r"([A-Za-z]+)") + r"(?![A-Za-z0-9])[)\].:]?", span,
                    flags)
    if lead and lettered and not lead.group(0).startswith(("(", "[")) \
            and _LEAD_PROSE.match(span, lead.end(1)):
        # Rule 6: "I would ...", "I'm ...", "A patient ...", "E. coli": a pronoun, article or
        # abbreviation opening prose, not a letter answer, even when it is one of the labels.
        lead = None
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
        # "option C", "choice (C)", "(C)", "[C]" (closed, so "(N<4)" or "(N: 5-15)" is no letter).
        hits += re.findall(r"\b(?i:option|choice|letter)\s+[(\[]?([A-Z])(?![A-Za-z0-9])", remaining)
        hits += re.findall(r"[(\[]([A-Z])[)\]]", remaining)
        # Bare capitals that are labels, unless they read as an article or pronoun ("A patient") or
        # name something ("vitamin C", "hepatitis B"): only at the start, after punctuation, or after
        # a choosing word ("likely B", "go with B") does a lone capital count as a letter, and
        # never before prose (rule 6).
        hits += re.findall(r"(?:^|[^A-Za-z0-9\s(\[]\s*|\b" + _CHOOSERS + r"\s+)"
                           r"([" + "".join(labels) + r"])(?![A-Za-z0-9])"
                           rf"(?!{_HIT_PROSE})", remaining)
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
