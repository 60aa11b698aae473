"""The one answer extractor: evaluation scores with it and the GRPO accuracy reward pays with it.

Hand-written on purpose: lm-evaluation-harness and open-r1/math-verify extractors take the first
"answer is" anywhere (including inside the reasoning) or count unparseable output generously;
Gazal's rules are strict so a model cannot farm credit by hedging or by answering inside <think>.

Rules, in order:
1. If the completion contains </think>, only the text after the last </think> is read; a <think>
   that is never closed means no answer (truncated reasoning).
2. An explicit answer statement ("the answer is", "Answer:", "Answer —", "Final answer",
   \\boxed{} (also \\boxed{\\text{B}}), a line holding only the label, "Option B" / "Choice C" alone,
   or a verdict on a label: "B is the correct answer", "I believe (C) is correct", "option b is the
   best choice", "that leaves D as the answer", "makes (C) the most likely answer"; a heading such
   as "### Answer" reads the line below it; a single line giving a letter and its text, "**C —
   Radial nerve**", is that letter) wins over labels merely mentioned; the last statement wins.
   "The answer isn't A but D" states D: the "is" of "isn't" is no statement's verb.
3. Option text maps to its letter, longest exact match first ("Vitamin B12" is not "Vitamin B1").
4. A label the statement sets aside is not an answer: "not B", "rather than B", "instead of B",
   "D over A", "B is wrong / unlikely / a distractor / ruled out". So "C, not B" is C, "not B" alone
   is no answer, and "B is wrong; the answer is C" is C.
5. Two or more different options offered as answers in the final statement is a hedge: no answer.
   Besides "B or C", "B/C", "either B or C", "B and C", this covers a second option offered as
   possible: "B, possibly D", "B (or perhaps D)", "B and maybe D", "B, though D is also possible",
   "B; D can't be ruled out", "B, with D a close second", "both B and D are reasonable", "either
   B or D", "\\boxed{B} or \\boxed{D}", and a later sentence that reopens it ("B. It might also be D").
   Options named only in the explanation ("C, because A and B would drop the pressure") are not
   offered, so they do not make a hedge. The options listed line by line ("A. ...", "B. ...") with
   none chosen are no answer, not the last one listed.
6. A letter that is not one of the options is no answer (status not_an_option).
7. A capital letter that opens a sentence is prose, not a letter, when it stands bare before a
   lowercase word or a contraction, or has a full stop before an all-lowercase word ("E. coli"),
   or opens a compound or an age ("D-dimer", "C-reactive", "A 45-year-old"); "A CT scan ..." is the
   article before an acronym and "I was ..." the pronoun: "I would go with B" is B, "A patient
   with ..." is no letter. A word that explains an answer ("A because ...", "C is
   correct", "C rather than B") keeps the letter, and so do brackets, a colon or a capital after the
   full stop: "(I) ...", "I) ...", "I. Nephrotic syndrome". This holds whether or not the letter is
   an option, since "I" and "A" are labels once a question has enough options. A capital after a
   number or a degree sign is a unit ("38 °C"), not a letter.
8. On lettered questions a lowercase letter counts only in forms prose never uses: "(b)", "[b]",
   "b)", "b." opening the statement, "option b", a statement that is nothing but the letter
   ("answer: c", "**b**", "b or c"), or a letter closing it after a choosing word ("I'd go with
   b."). So "a beta blocker" is not A and "hepatitis b." is not B.
"""

from __future__ import annotations

import functools
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


# "The (final/correct) answer is", "Answer:", "Final answer -", "Answer — C", "correct option is" ...
_STATEMENT = re.compile(
    r"(?:\b(?:final|correct|best|right)\s+(?:answer|option|choice)\b(?:\s+is\b(?![’']))?"
    r"|\banswer\s+is\b(?![’'])|\banswer\b\s*(?=[:\-–—=])|\boption\s+is\b(?![’'])|\bchoice\s+is\b(?![’']))"
    r"\s*(?:\*\*)?\s*[:\-–—=]?\s*",
    re.IGNORECASE,
)
# One level of nested braces, for \boxed{\text{B}} and \boxed{\textbf{(C)}}.
_BOXED = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
# Font commands only: "\\sqrt{2}" must keep its command, or an option text shrinks to a bare "2".
_MARKUP = re.compile(r"[*_`$]|\\(?:text|textbf|textit|textrm|texttt|mathrm|mathbf|mathit|mathsf|bf|it|rm)\b\s*\{?|[{}]")
_CONNECTOR = re.compile(r"^\s*(?:,|/|&|\bor\b|\band\b|\band/or\b)\s*", re.IGNORECASE)

# Rule 7. Words that may follow a bare letter answer without making it prose ("A because the rash
# is vesicular", "C is correct", "B or C"). Any other lowercase word after a bare capital, or a
# contraction ("I'm", "I'd"), means the capital is an article or pronoun opening a sentence.
_EXPLAINS = (r"(?:because|since|as|given|due|is|was|fits|explains|makes|matches|appears|looks|remains|which|seems"
             r"|or|and|it\s+is)\b")
_CONTRACTION = r"['’][a-z]"
# "D-dimer", "C-reactive", "A 45-year-old": a capital that opens a compound or an age is a word.
_COMPOUND = r"-[A-Za-z0-9]|\s+\d+(?:\.\d+)?-[a-z]"
_PROSE_AFTER = rf"(?:{_CONTRACTION}|{_COMPOUND}|\s+(?!{_EXPLAINS})[a-z])"
# "A CT scan ...", "A DVT is ...": the article before an acronym and a lowercase word.
_ARTICLE_ACRONYM = r"(?<=A)\s+[A-Z][A-Z0-9]+(?:-[A-Za-z0-9]+)?\s+[a-z]"
# With a full stop, only an all-lowercase word makes it prose: "E. coli", "S. aureus" are
# organisms, while "A. eGFR 38 ..." is the letter A followed by its explanation.
_GENUS_WORD = r"[a-z]+(?![A-Za-z0-9])"
# Text right after the letter that opens a statement and makes that letter prose.
# "I was unsure" is the pronoun.
_LEAD_PROSE = re.compile(rf"{_PROSE_AFTER}|\.\s+(?!{_EXPLAINS}){_GENUS_WORD}|(?<=I)\s+was\b|{_ARTICLE_ACRONYM}")
# The same for a capital found inside a statement; stricter (fewer words may follow), since this
# also reads a last line that states nothing. "was" is left out because "so I was unsure" is the
# pronoun; "37.3 °C or higher" is kept out by the unit rule instead.
_HIT_FOLLOWERS = (r"(?:because|since|as|given|due|is|fits|explains|which|seems|or|and|nor|rather|over|instead"
                  r"|not|but|though|although|here|the\s+(?:\w+\s+)?(?:answer|choice|option))\b")
_HIT_PROSE = rf"{_CONTRACTION}|{_COMPOUND}|\s+(?!{_HIT_FOLLOWERS})[a-z]|\.\s+{_GENUS_WORD}|{_ARTICLE_ACRONYM}"
# Words after which a lone capital is a chosen letter ("likely B", "I would go with B", "it's B").
_CHOOSERS = (r"(?i:likely|probably|possibly|perhaps|maybe|definitely|clearly|actually|really|indeed|ultimately"
             r"|certainly|therefore|thus|so|is|be|think"
             r"|believe|guess|choose|pick|select|with|say|option|choice|letter|answer|prefer|makes?|making"
             r"|(?:it|that)['’]s|(?:go|going|opt|vote)\s+for|lean(?:ing)?\s+(?:towards?|to)"
             r"|(?:settle|settling|land|landing|decide|deciding)\s+on)")
# "Option B", "the choice (C)": the word only introduces the letter, so it is dropped before the
# letter is read (then "Option B or C" is a hedge like "B or C").
_OPTION_WORD = re.compile(r"^(?i:the\s+)?(?i:option|choice|letter)\s+(?=[(\[]?[A-Z](?![A-Za-z0-9]))")

# Rule 8: lowercase letters that can only be option letters, capitalised before reading.
_LOWER_ONLY_LETTERS = re.compile(  # the whole statement: "b", "(b).", "b or c"
    r"^[(\[]?[a-z][)\]]?(?:\s*(?:,|/|&|\b(?i:or|and/or|and)\b)\s*[(\[]?[a-z][)\]]?)*\s*[.:!]?$")
_LOWER_FORMS = [
    re.compile(r"(?<![A-Za-z0-9])[(\[]([a-z])[)\]]"),  # "(b)", "[b]"
    re.compile(r"(?<![A-Za-z0-9(\[])([a-z])\)"),  # "b)"
    re.compile(r"^([a-z])\.(?!\S)(?!\s+[a-z])"),  # "b." opening the statement: "b. Nephrotic ..."
    re.compile(rf"\b(?i:option|choice|letter)\s+[(\[]?([a-z])(?![A-Za-z0-9'’])(?!{_PROSE_AFTER})"),
    re.compile(rf"\b{_CHOOSERS}\s+([a-z])\s*[.!]?$"),  # closing: "I'd go with b."
]

# Rule 2, verdicts: "B is the correct answer", "I believe (C) is correct", "option b is the best choice".
# Without them "correct answer" in "B is the correct answer" would be read as a statement of nothing.
_VERDICT_PREDICATE = (
    r"\s+(?i:is|would\s+be|must\s+be|should\s+be|seems(?:\s+to\s+be)?|appears(?:\s+to\s+be)?"
    r"|looks\s+like|remains)\s+"
    r"(?i:(?:the|my|our|clearly|definitely|certainly|probably|indeed|therefore|thus|single|only|most|best|final)\s+)*"
    r"(?i:correct|right|best|true|answer|choice|option|appropriate|accurate|(?<=most\s)likely)\b"
    # "B would be correct if she were pregnant", "I would be right to worry": not a verdict.
    r"(?!\s+(?i:if|only|when|unless|to)\b)")
# Found first, then the label is looked for just before it: verdicts are rare, and a label pattern
# run over the whole text would cost more than the rest of the extraction.
_VERDICT_TAIL = re.compile(_VERDICT_PREDICATE)


@functools.lru_cache(maxsize=64)
def _verdict_label(labels: tuple[str, ...], lettered: bool) -> re.Pattern[str]:
    """The label that ends the text before a verdict predicate (the text runs from its line start)."""
    # A bare label needs what a chosen letter needs (start, punctuation or a choosing word), so that
    # "vitamin D is the most likely deficiency" is no verdict; "option b" and "(b)" need nothing.
    before = rf"(?:^|[^A-Za-z0-9\s(\[°][ \t]*|\b(?:{_CHOOSERS}|that)[ \t]+)"
    if lettered:
        label = (r"(?:(?P<label>\b(?i:option|choice|letter)[ \t]+[(\[]?[A-Za-z][)\]]?"
                 r"|(?<![A-Za-z0-9])[(\[][A-Za-z][)\]])"
                 rf"|{before}(?P<bare>[A-Z])(?![A-Za-z0-9'’\-]))")
    else:
        words = "|".join(re.escape(lab) for lab in sorted(labels, key=len, reverse=True))
        label = rf"{before}(?P<bare>(?i:{words}))\b"
    return re.compile(label + r"[*_`]*\Z")


# Rule 4: labels the statement sets aside. {one} is one label token, {many} a list of them joined by
# or/and/nor ("A, B, or C"); a list needs the conjunction, so "A, B is wrong" sets aside B only.
# "would not rule out D" offers D (rule 5) rather than setting it aside, hence the lookbehinds.
_REJECT_WORDS = (r"(?i:not|nor|neither|rather\s+than|instead\s+of|over|as\s+opposed\s+to|except|excluding|unlike"
                 r"|against|(?<!not\s)(?<!n't\s)(?<!n’t\s)(?:rul(?:e|es|ed|ing)\s+out|exclud(?:e|es|ed))"
                 r"|eliminat(?:e|es|ed|ing)|avoid(?:s|ed|ing)?|reject(?:s|ed|ing)?|isn['’]t|aren['’]t|wasn['’]t"
                 # "I don't think it's A", "I wouldn't choose A" (the pronoun goes too: no "I" is left)
                 r"|(?:\bI\s+)?(?:don['’]t|do\s+not|doesn['’]t|does\s+not|wouldn['’]t|would\s+not|can['’]t"
                 r"|cannot)\s+"
                 r"(?:think|believe|say|choose|pick|select|go\s+with|favou?r)"
                 r"(?:\s+(?:that|it['’]s|it\s+is|it\s+would\s+be|it\s+could\s+be|the\s+answer\s+is))?)")
# "not C but B": the "but" goes with the rejection, leaving B after punctuation like "C; B".
_REJECT_BEFORE = _REJECT_WORDS + r"\s+(?:{many}|{one})(?:\s*,?\s*(?i:but)\b)?"
_REJECTED = (r"(?:(?:clearly|definitely|obviously|certainly|also|therefore|thus|then|both|all|much|far)\s+)*"
             r"(?:wrong|incorrect|false|untrue|unlikely|less\s+likely|least\s+likely|not\b|a\s+distractor"
             r"|distractors|an?\s+trap|traps|a\s+red\s+herring|red\s+herrings|ruled\s+out|excluded|eliminated"
             r"|contraindicated|inappropriate|implausible|out\b)")
_REJECT_AFTER = (
    r"{one}\s+(?i:(?:is|was|seems|looks|appears)\s+" + _REJECTED + ")"
    r"|{many}\s+(?i:(?:are|were|seem|look|appear)\s+" + _REJECTED + ")"
    r"|(?:{many}|{one})\s+(?i:(?:can|could|should|must|may)\s+be\s+(?:ruled\s+out|excluded|eliminated|dismissed"
    r"|discarded)|(?:does\s+not|doesn['’]t|do\s+not|don['’]t|cannot|can['’]t|fails?\s+to)\s+(?:fit|explain|apply"
    r"|match))")
# Option text set aside ("verapamil, not adenosine"): the text before it ends with a rejecting word.
_REJECT_TAIL = re.compile(_REJECT_WORDS + r"\s+(?:the\s+)?$")
_REJECT_OPTION_AFTER = re.compile(
    r"^\s+(?i:(?:is|are|was|were)\s+(?:(?:clearly|definitely|also|therefore|thus)\s+)*"
    r"(?:wrong|incorrect|unlikely|less\s+likely|not\b|a\s+distractor|ruled\s+out|excluded|contraindicated))")

# Rule 5: a second label offered as possible. {t} is one label token (its label captured).
# Before the label: "or possibly D", "(perhaps D)", "and maybe C", "either B ...", "B/D".
_ALT_BEFORE = (r"(?:\b(?i:or|either|possibly|perhaps|maybe|alternatively|potentially|conceivably|also"
               r"|lean(?:s|ing)?(?:\s+(?:towards?|to))?)\b"
               r"|(?i:not|n['’]t)\s+(?i:rule\s+out|exclude|dismiss)\b|/)"
               r"(?:\s+(?i:possibly|perhaps|maybe|even|also|else|just|potentially|alternatively|conceivably"
               r"|at\s+(?:best|most|worst|least)|slightly|somewhat))*"
               r"\s*{t}")
# After the label: "though D is also possible", "B might also be right", "C can't be ruled out",
# "D (B is a close alternative)", "with D as a close second". The label must open a clause, so
# that "hepatitis B is also possible" is no hedge.
_ALT_OPENS = (r"(?:^|[^\w\s]|\b(?i:though|although|but|and|while|whereas|with|yet|however|also|or|perhaps"
              r"|possibly|maybe)\b)\s*")
_ALT_AFTER = (
    _ALT_OPENS + r"{t}\s+(?i:"
    r"(?:(?:is|are|would|could|might|may|seems?|remains?|also|still|equally|well|be|quite|very|reasonably|too)\s+)*"
    r"(?:possible|plausible|defensible|acceptable|reasonable|viable|tenable|arguable|worth\s+considering)\b"
    r"|(?:(?:is|are|would|could|might|may|also|still|be|remains?)\s+)*an?\s+"
    r"(?:(?:close|strong|good|reasonable|valid|possible|plausible|viable)\s+)*"
    r"(?:alternative|second|contender|candidate|possibility|option|runner[- ]up)\b"
    r"|(?:(?:is|are|would|could|might|may|seems?)\s+)?(?:also|equally|too)\s+(?:be\s+)?"
    r"(?:correct|right|true|valid|likely|reasonable)\b"
    r"|(?:might|could|may)\s+(?:(?:also|well|equally|even)\s+)*be\s+(?:correct|right|true|valid|the\s+answer|it)\b"
    r"|(?:can(?:not|['’]t|\s+not)|could(?:\s+not|n['’]t))\s+be\s+(?:ruled\s+out|excluded|dismissed|discounted)\b"
    r"|as\s+an?\s+(?:close\s+)?(?:second|alternative|backup|runner[- ]up)\b)"
    r"(?!\s+(?i:if|only|when|unless|in\s+an?)\b)")
# Words that may follow an offered label without making it prose ("or possibly D if ...").
_ALT_FOLLOWERS = (r"(?:is|are|would|could|might|may|as|too|if|though|although|but|also|seems|because|since"
                  r"|here|for|and|or|instead|rather|over|not|depending|based|given|according|assuming|pending"
                  r"|until|unless)\b")
# "or" offering a label reaches only as far as the choice itself: an explanation that names other
# options ("C, because A or B would drop the pressure") offers nothing.
_ALT_CUT = re.compile(r"\b(?i:because|since|as|given|due|which|so|thus|therefore|hence|if|when|whereas|while|that"
                      r"|who|where)\b|[.!?](?=\s+(?!(?i:or|possibly|perhaps|maybe|alternatively|either)\b)|$)")


# "it could also be D", "might equally be C": a second option offered in a later sentence, which the
# offer window of _ALT_BEFORE (cut at the full stop) does not reach.
_ALT_COULD_BE = (r"\b(?i:could|might|may)\s+(?i:also|equally|just\s+as\s+well|as\s+well|well)\s+(?i:be\s+)?{t}")
# "though D is also possible if she is anxious": "also" offers D, whatever condition follows (without
# it, "D would be correct if she were pregnant" is a condition, not an offer).
_ALT_ALSO = (_ALT_OPENS + r"{t}\s+(?i:(?:is|are|would|could|might|may|be|still)\s+)*(?i:also|equally)\s+(?i:be\s+)?"
             r"(?i:possible|plausible|reasonable|defensible|viable|acceptable|correct|right|likely)\b")
# Two labels put forward together: "both A and D are reasonable", "either B or C" ("between A and C" is
# not: "Between A and C, I would go with C" chooses).
_PAIR = r"\b(?i:both|either)\s+{a}\s*,?\s*(?:\b(?i:and|or)\b|/|&)\s*{b}"


@dataclass(frozen=True)
class _Patterns:
    reject: re.Pattern[str]
    alt_before: re.Pattern[str]
    alt_after: re.Pattern[str]
    alt_could_be: re.Pattern[str]
    alt_also: re.Pattern[str]
    pair: re.Pattern[str]


@functools.lru_cache(maxsize=64)
def _patterns(labels: tuple[str, ...], lettered: bool) -> _Patterns:
    if lettered:
        def token(letter: str) -> str:
            return (rf"(?<![A-Za-z0-9])(?:(?:the\s+)?(?i:option|choice|letter)\s+)?[(\[]?{letter}[)\]]?"
                    r"(?![A-Za-z0-9])(?!-[A-Za-z0-9])")
        one, captured = token("[A-Z]"), token("(?P<label>[A-Z])")
        first, second = token("(?P<a>[A-Z])"), token("(?P<b>[A-Z])")
        follow = rf"(?!{_CONTRACTION})(?!\s+(?!{_ALT_FOLLOWERS})[a-z])"
    else:
        words = "|".join(re.escape(lab) for lab in sorted(labels, key=len, reverse=True))
        one, captured = rf"\b(?i:{words})\b", rf"\b(?P<label>(?i:{words}))\b"
        first, second = rf"\b(?P<a>(?i:{words}))\b", rf"\b(?P<b>(?i:{words}))\b"
        follow = rf"(?!\s+(?!{_ALT_FOLLOWERS})[a-z])"
    many = rf"{one}(?:\s*,\s*{one})*\s*,?\s*(?:\b(?i:or|and|nor)\b|/|&)\s*{one}"
    reject = re.compile(f"(?:{_REJECT_BEFORE.format(one=one, many=many)}|{_REJECT_AFTER.format(one=one, many=many)})")
    return _Patterns(reject, re.compile(_ALT_BEFORE.format(t=captured) + follow),
                     re.compile(_ALT_AFTER.format(t=captured)), re.compile(_ALT_COULD_BE.format(t=captured) + follow),
                     re.compile(_ALT_ALSO.format(t=captured)),
                     re.compile(_PAIR.format(a=first, b=second) + (rf"(?!{_CONTRACTION})" if lettered else "")))


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


# What may surround a statement that is nothing but a label: "C.", "(C)", "[yes]".
_PUNCTUATION = " .,:;!?()[]"


def _clean(text: str) -> str:
    return " ".join(_MARKUP.sub(" ", text).split())


def _words(labels: Sequence[str]) -> str:
    return "(?i:" + "|".join(re.escape(lab) for lab in sorted(labels, key=len, reverse=True)) + ")"


def _lift_lowercase_letters(span: str) -> str:
    """Capitalise the lowercase letters that rule 8 reads as option letters ("(b)" -> "(B)").

    Only forms that prose never uses count, because a lone "a" is usually the article.
    """
    if _LOWER_ONLY_LETTERS.match(span):
        return span.upper()

    def capitalise_letter(m: re.Match[str]) -> str:  # group 1 is the letter; keep what surrounds it
        return m.string[m.start():m.start(1)] + m.group(1).upper() + m.string[m.end(1):m.end()]

    for form in _LOWER_FORMS:
        span = form.sub(capitalise_letter, span)
    return span


# "leaves D as the answer", "make D the answer", "C as my final choice": a label made the answer by
# a verb, or named "as" the answer.
_MADE_ANSWER = (r"(?:(?:\b(?i:makes?|making|made|leaves?|leaving|left|consider(?:s|ed|ing)?|renders?|keeps?)\s+{a}"
                r"|{b}\s+(?i:as))\s+(?i:the|my|our)\s+"
                r"(?i:(?:correct|best|right|final|most\s+likely|likely|only|single|clear|obvious)\s+)?"
                r"(?i:answer|choice|option|pick)\b"
                # "which makes this C, not B": the idiom alone chooses
                r"|\b(?i:makes?|making|made)\s+(?i:this|it|that)\s+{c}(?!\s+[a-z]))")


@functools.lru_cache(maxsize=64)
def _made_answer(labels: tuple[str, ...], lettered: bool) -> re.Pattern[str]:
    label = "[A-Z]" if lettered else _words(labels)
    return re.compile(_MADE_ANSWER.format(**{g: rf"[(\[]?(?P<{g}>{label})[)\]]?(?![A-Za-z0-9'’\-])" for g in "ac"},
                                          b=rf"(?<![A-Za-z0-9])[(\[]?(?P<b>{label})[)\]]?(?![A-Za-z0-9'’\-])"))


# A heading that announces the answer on the lines below it ("### Answer", "**Verdict**",
# "### Corrected answer").
_HEADING = re.compile(r"^[ \t#*_>]*(?:[A-Za-z-]+\s+){0,2}(?i:answer|conclusion|verdict|bottom\s+line)"
                      r"[ \t*_:]*$", re.MULTILINE)
# A line that gives a letter with something after it: "C. Radial nerve", "**C — Radial nerve.**",
# "(B) Acute cholecystitis". One such line is the answer; several are the options listed.
_LABELLED_LINE = re.compile(r"^[ \t*_#>]*[(\[]?([A-Z])(?:[)\]]|[ \t*_]*(?:[.:]|\s[—–-]))[ \t*_]*(?![a-z]{2,}\b)\S.*$",
                            re.MULTILINE)


_INLINE_OPTION = re.compile(r"(?<![A-Za-z0-9])([A-Z])[.)]\s+(?=[A-Z0-9])")


def _labelled_lines(text: str, labels: Sequence[str]) -> list[re.Match[str]]:
    return [m for m in _LABELLED_LINE.finditer(text) if m.group(1) in labels]


def _line_end(text: str, pos: int) -> int:
    end = text.find("\n", pos)
    return len(text) if end < 0 else end


def _statements(text: str, labels: Sequence[str], lettered: bool) -> list[tuple[int, int, str]]:
    """Explicit answer statements as (start, end of its line, the text that states the answer)."""
    found: list[tuple[int, int, str]] = []
    verdicts: list[tuple[int, int]] = []
    verdict_label = _verdict_label(tuple(labels), lettered)
    for tail in _VERDICT_TAIL.finditer(text):
        line_start = text.rfind("\n", 0, tail.start()) + 1
        m = verdict_label.search(text[line_start:tail.start()])  # a slice, so that ^ is the line start
        if not m:
            continue
        group = "label" if lettered and m.group("label") else "bare"
        start, end = line_start + m.start(group), _line_end(text, tail.end())
        # The label and what follows the verdict on its line, where a hedge would be; the ";" keeps
        # the leftover of the verdict ("B ; next step") from reading as prose after the letter.
        found.append((start, end, m.group(group) + " ; " + text[tail.end():end]))
        verdicts.append((start, tail.end()))
    for m in _made_answer(tuple(labels), lettered).finditer(text):
        group = next(g for g in "abc" if m.group(g))
        label, start = m.group(group), m.start(group)
        end = _line_end(text, m.end())
        found.append((start, end, label + " ; " + text[m.end():end]))
        verdicts.append((start, m.end()))  # "final choice" in "B as my final choice" is part of it
    for m in _STATEMENT.finditer(text):
        if any(a <= m.start() < b for a, b in verdicts):
            continue  # "correct answer" inside "B is the correct answer" belongs to the verdict
        end = _line_end(text, m.end())
        found.append((m.start(), end, text[m.end():end]))
    boxed_end = -1
    for m in _BOXED.finditer(text):
        between = text[boxed_end:m.start()].replace("$", " ").strip() if boxed_end >= 0 else None
        if between is not None and re.fullmatch(r"(?i:or|and|and/or|/|,|&)", between):
            # "$\boxed{A}$ or $\boxed{D}$" offers both, as "\boxed{A or D}" would.
            start, _, previous = found.pop()
            found.append((start, _line_end(text, m.end()), f"{previous} {between} {m.group(1)}"))
        else:
            found.append((m.start(), _line_end(text, m.end()), m.group(1)))
        boxed_end = m.end()
    for m in _HEADING.finditer(text):
        below = re.search(r"\S[^\n]*", text[m.end():])
        if below:
            found.append((m.start(), m.end() + below.end(), below.group(0)))
    if lettered:
        labelled = _labelled_lines(text, labels)
        # Not where something else states the answer ("(B) Proteus ..." after "The answer is ..."
        # explains), nor on a line that lists the options.
        if len(labelled) == 1 and not found and len(set(_INLINE_OPTION.findall(labelled[0].group(0)))) < 3:
            m = labelled[0]
            found.append((m.start(), m.end(), m.group(1) + " ; " + text[m.end(1) + 1:m.end()]))
    # A line that holds only a label (with brackets, bold or a full stop around it); on lettered
    # questions also "Option B" / "Choice (C)" and a lowercase letter (rule 8: "b" alone is B).
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


def _offered(span: str, anchor: int, pats: _Patterns) -> list[str]:
    """Labels offered as possible answers besides the chosen one (rule 5)."""
    cut = _ALT_CUT.search(span, anchor)
    limit = cut.start() if cut else len(span)
    offered = [m.group("label") for m in pats.alt_before.finditer(span) if m.start() < limit]
    offered += [m.group(g) for m in pats.pair.finditer(span) for g in ("a", "b")]
    return offered + [m.group("label") for pat in (pats.alt_after, pats.alt_could_be, pats.alt_also)
                      for m in pat.finditer(span)]


def _read_statement(
    span: str, labels: Sequence[str], options: Mapping[str, str] | None, lettered: bool
) -> Extraction:
    """Decide what one statement answers."""
    span = _clean(span)
    if not span:
        return Extraction(None, NO_ANSWER)
    flags = 0 if lettered else re.IGNORECASE
    canon = {lab.lower(): lab for lab in labels}
    pats = _patterns(tuple(labels), lettered)
    if lettered:
        span = _OPTION_WORD.sub("", _lift_lowercase_letters(span))
    bare = span.strip(_PUNCTUATION)
    if (len(bare) == 1 and bare.isupper()) if lettered else bare.lower() in canon:
        # "C.", "(C)", "yes": nothing is set aside or offered; most statements are this, and the
        # rule 4 and 5 patterns are the costly part of reading one.
        return _decide([bare], labels)
    # Nothing but labels: "yes no maybe yes", "A B C D" offer them all.
    tokens = re.split(r"[\s.,;:/()\[\]]+", bare)
    if len(tokens) > 1 and all((t in labels) if lettered else (t.lower() in canon) for t in tokens):
        return _decide(tokens, labels)
    # Rule 4: a label set aside is gone before anything is read ("C, not B" reads as "C ;").
    span = " ".join(pats.reject.sub(" ; ", span).split())
    lead = re.match(r"^[(\[]?\s*" + (r"([A-Z])" if lettered else r"([A-Za-z]+)") + r"(?![A-Za-z0-9])[)\].:]?", span,
                    flags)
    if lead and lettered and not lead.group(0).startswith(("(", "[")) \
            and _LEAD_PROSE.match(span, lead.end(1)):
        # Rule 7: "I would ...", "I'm ...", "A patient ...", "E. coli": a pronoun, article or
        # abbreviation opening prose, not a letter answer, even when it is one of the labels.
        lead = None
    # The statement opens with a label: read it and any labels chained to it with or/and/commas.
    if lead and (lettered or lead.group(1).lower() in canon):
        chosen = [lead.group(1)]
        rest_at = lead.end()
        while True:
            conn = _CONNECTOR.match(span[rest_at:])
            if not conn:
                break
            nxt = re.match(r"[(\[]?\s*" + (r"([A-Z])" if lettered else r"([A-Za-z]+)") + r"(?![A-Za-z0-9])[)\]]?",
                           span[rest_at + conn.end():], flags)
            if not nxt or (not lettered and nxt.group(1).lower() not in canon):
                break
            chosen.append(nxt.group(1))
            rest_at += conn.end() + nxt.end()
        # The offer window starts at the letter, so that the full stop in "B. A or C would ..." ends it.
        return _decide(chosen + _offered(span, lead.end(1), pats), labels)
    # Otherwise look for option texts (longest first, so "Vitamin B12" beats "Vitamin B1") and
    # for labels standing alone ("option C", "(C)").
    hits: list[tuple[int, str]] = []
    remaining = span
    if options:
        for letter, text in sorted(options.items(), key=lambda kv: -len(kv[1])):
            t = _clean(text)
            if not t:
                continue
            pat = re.compile(rf"(?<![A-Za-z0-9]){re.escape(t)}(?![A-Za-z0-9])", re.IGNORECASE)
            for m in pat.finditer(remaining):
                if not (_REJECT_TAIL.search(remaining, 0, m.start())
                        or _REJECT_OPTION_AFTER.match(remaining[m.end():])):
                    hits.append((m.start(), letter))
            remaining = pat.sub(lambda m: " " * len(m.group(0)), remaining)  # keep positions
    if lettered:
        # "option C", "choice (C)", "(C)", "[C]" (closed, so "(N<4)" or "(N: 5-15)" is no letter).
        hits += [(m.start(1), m.group(1)) for m in
                 re.finditer(r"\b(?i:option|choice|letter)\s+[(\[]?([A-Z])(?![A-Za-z0-9])", remaining)]
        hits += [(m.start(1), m.group(1)) for m in re.finditer(r"[(\[]([A-Z])[)\]]", remaining)]
        # Bare capitals that are labels, unless they read as an article or pronoun ("A patient") or
        # name something ("vitamin C", "hepatitis B", "38 °C"): only at the start, after
        # punctuation, or after a choosing word ("likely B", "go with B") does a lone capital count
        # as a letter, and never before prose (rule 7).
        hits += [(m.start(1), m.group(1)) for m in
                 re.finditer(r"(?:^|[^A-Za-z0-9\s(\[°]\s*|\b" + _CHOOSERS + r"\s+)"
                             r"([" + "".join(labels) + r"])(?![A-Za-z0-9])"
                             rf"(?!{_HIT_PROSE})", remaining)]
    else:
        hits += [(m.start(), m.group(0)) for m in
                 re.finditer("|".join(_label_pattern(l, False) for l in labels), remaining, re.IGNORECASE)]
    anchor = min((pos for pos, _ in hits), default=0)
    # Option texts are blanked in `remaining`, so a capital inside one ("Group A or B strep") is no offer.
    found = [label for _, label in hits] + _offered(remaining, anchor, pats)
    if not found:
        return Extraction(None, NO_ANSWER)
    return _decide(found, labels)


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
    lines = [line for line in text.splitlines() if line.strip()]
    if lettered:
        listed = _labelled_lines(text, labels)
        if len({m.group(1) for m in listed}) > 1 and listed[-1].group(0).strip() == lines[-1].strip():
            return Extraction(None, NO_ANSWER)  # the options listed (or echoed) line by line, none chosen
        if len(set(_INLINE_OPTION.findall(lines[-1])) & set(labels)) >= 3:
            return Extraction(None, NO_ANSWER)  # "A. Valproate B. Lamotrigine C. ...": listed on one line
    return _read_statement(lines[-1], labels, options, lettered)


def is_correct(extraction: Extraction, gold: str) -> bool:
    """Credit only for a clean answer equal to the gold label."""
    return extraction.status == OK and extraction.label is not None and extraction.label.lower() == gold.lower()
