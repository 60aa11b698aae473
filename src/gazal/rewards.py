"""GRPO reward components, in TRL's contract: fn(completions, **dataset_columns) -> list[float | None].

Each component is a factory taking its recipe parameters and returning a small pure function;
REWARDS maps recipe names to factories (open-r1 style); a dotted 'package.module:function' path
admits a user's own factory. Factories may also declare `tokenizer` or `max_completion_length`
keyword arguments, which Gazal fills in from the recipe.

Anti-hacking rules (see issue 4 and the audit in gazal.audit):
- accuracy uses the shared extractor: hedges and non-options are wrong, a bad gold label is None;
- length and quality rewards pay only well-formed completions (one non-empty <think> block first,
  then exactly one clean answer statement, nothing substantive after it); everything else gets the
  *floor* of the component's range, so dropping the format can never dodge a penalty;
- lengths are in tokens, and every component's output is clipped to its documented range.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import snowballstemmer

from gazal.answer import HEDGE, NO_ANSWER, OK, YES_NO_MAYBE, answer_statements
from gazal.errors import GazalError
from gazal.judge import DEFAULT_API_KEY_ENV, Judge, JudgeRequest
from gazal.tasks import completion_text, prompt_text, score

RewardFn = Callable[..., list[float | None]]


def _choices(options: Mapping[str, str | None] | None, labels: Sequence[str] | None) -> tuple[list[str], dict | None]:
    # Arrow stores a column of option dicts as one struct with every letter seen in the column;
    # letters a row does not have come back as None and are dropped here.
    opts = {k: v for k, v in (options or {}).items() if v is not None} or None
    if opts:
        return list(opts), opts
    return list(labels or YES_NO_MAYBE), None


def _row(i: int, options: list | None, labels: list | None) -> tuple[list[str], dict | None]:
    return _choices(options[i] if options else None, labels[i] if labels else None)


def _gold(answer: Any, labels: Sequence[str]) -> str | None:
    if not isinstance(answer, str) or answer.strip().lower() not in {x.lower() for x in labels}:
        return None
    return answer.strip()


# One reasoning block, first, non-empty, closed; no reasoning tag after it.
_FORMAT = re.compile(r"^\s*<think>(?P<think>(?:(?!<think>|</think>).)+?)</think>(?P<after>.*)$", re.DOTALL)


@dataclass(frozen=True)
class Parsed:
    """A completion judged for form: its reasoning, its answer part, and whether it is well-formed."""

    think: str
    after: str
    well_formed: bool
    reason: str


def parse(text: str, labels: Sequence[str], options: Mapping[str, str] | None, max_trailing_chars: int = 200) -> Parsed:
    """Check the Gazal answer format: <think>reasoning</think> then one clean final answer statement."""
    return _parse(text, tuple(labels), tuple((options or {}).items()) or None, max_trailing_chars)


@functools.lru_cache(maxsize=4096)
def _parse(text: str, labels: tuple, option_items: tuple | None, max_trailing_chars: int) -> Parsed:
    # Cached: format, length, repetition and reasoning rewards all parse the same completion.
    options = dict(option_items) if option_items else None
    m = _FORMAT.match(text)
    if not m or not m.group("think").strip():
        return Parsed("", "", False, "no single non-empty reasoning block first")
    think, after = m.group("think"), m.group("after")
    if "<think>" in after or "</think>" in after:
        return Parsed(think, after, False, "reasoning tags after the reasoning block")
    statements = answer_statements(after, labels, options)
    if not statements:
        return Parsed(think, after, False, "no answer statement after the reasoning")
    if any(s.extraction.status != OK for s in statements):
        return Parsed(think, after, False, "an answer statement is a hedge, not an option, or empty")
    if len({s.extraction.label for s in statements}) > 1:
        return Parsed(think, after, False, "conflicting answer statements")
    if len(after[statements[-1].end:].strip()) > max_trailing_chars:
        return Parsed(think, after, False, "substantive text after the final answer")
    return Parsed(think, after, True, "ok")


def earns_quality(text: str, labels: Sequence[str], options: Mapping[str, str] | None, prompt: Any = None) -> bool:
    """Whether length and quality rewards may pay this completion: well-formed, and its reasoning is
    not the prompt copied back (an echo is short, tidy and says nothing, which a length reward loves)."""
    parsed = parse(text, labels, options)
    return parsed.well_formed and not echoes_prompt(parsed.think, prompt_text(prompt))


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


ECHO_THRESHOLD = 0.3


def echoes_prompt(think: str, prompt: str, threshold: float = ECHO_THRESHOLD) -> bool:
    """True when `threshold` or more of the reasoning's word trigrams are copied from the prompt.

    Honest reasoning quotes its findings but says them in its own words: on the 163 seed cases at
    most 0.19 of an honest completion's trigrams (0.10 of a full reasoning's; median 0.02) are the
    question's. 0.3 leaves that margin and refuses restated questions, not only verbatim copies."""
    grams = _ngrams(_words(think), 3)
    if not grams:
        return False
    source = _trigrams(prompt)
    return sum(g in source for g in grams) / len(grams) >= threshold


@functools.lru_cache(maxsize=1024)
def _trigrams(prompt: str) -> frozenset:
    # Cached: every completion of a group, and three components per completion, share the prompt.
    return frozenset(_ngrams(_words(prompt), 3))


def _lengths(completions: list, completion_ids: list | None, tokenizer) -> list[int]:
    if completion_ids is not None:
        return [len(ids) for ids in completion_ids]
    if tokenizer is None:
        raise GazalError("this reward measures tokens: pass completion_ids or build it with a tokenizer")
    return [len(tokenizer(completion_text(c), add_special_tokens=False)["input_ids"]) for c in completions]


# ---------------------------------------------------------------------------------------------
# Components


def accuracy() -> RewardFn:
    """1.0 for the gold answer, 0.0 otherwise (hedges and non-options are wrong); None for a bad gold label."""

    def accuracy_reward(completions: list, answer: list, options: list | None = None, labels: list | None = None,
                        log_metric: Callable | None = None, **_: Any) -> list[float | None]:
        out: list[float | None] = []
        statuses = []
        for i, completion in enumerate(completions):
            lab, opts = _row(i, options, labels)
            gold = _gold(answer[i], lab)
            extraction, correct = score(completion_text(completion), gold or "", lab, opts)
            statuses.append(extraction.status)
            out.append(None if gold is None else float(correct))
        if log_metric and statuses:
            log_metric("gazal/hedge_rate", statuses.count(HEDGE) / len(statuses))
            log_metric("gazal/no_answer_rate", statuses.count(NO_ANSWER) / len(statuses))
        return out

    return accuracy_reward


def format_(max_trailing_chars: int = 200) -> RewardFn:
    """1.0 for one non-empty <think> block first, then exactly one clean answer statement and nothing
    substantive after it (at most `max_trailing_chars`); else 0.0."""

    def format_reward(completions: list, options: list | None = None, labels: list | None = None,
                      log_metric: Callable | None = None, **_: Any) -> list[float]:
        out = []
        for i, completion in enumerate(completions):
            lab, opts = _row(i, options, labels)
            out.append(1.0 if parse(completion_text(completion), lab, opts, max_trailing_chars).well_formed else 0.0)
        if log_metric and out:
            log_metric("gazal/format_failure_rate", out.count(0.0) / len(out))
        return out

    return format_reward


def cosine_length(min_value_wrong: float = -0.5, max_value_wrong: float = 0.0, min_value_correct: float = 0.5,
                  max_value_correct: float = 1.0, max_len: int = 1024, floor_len: int = 0, tokenizer=None) -> RewardFn:
    """Cosine length scaling in tokens (Yeo et al. 2025) above a floor: for a correct answer the reward
    falls from max_value_correct (at floor_len tokens or fewer) to min_value_correct (max_len); for a
    wrong one it rises from min_value_wrong to max_value_wrong over the same span. Ill-formed
    completions, and reasoning that echoes the prompt, get the floor of the whole range.

    `floor_len` is what keeps the length term from being farmed: below it, shorter earns nothing
    more, so a several-step honest completion never loses to a three-line template for being longer.
    """
    if max_len <= 0 or not 0 <= floor_len < max_len:
        raise ValueError("max_len must be positive and 0 <= floor_len < max_len")
    floor = min(min_value_wrong, max_value_wrong, min_value_correct, max_value_correct)

    def cosine(t: int, start: float, end: float) -> float:
        progress = (min(max(t, floor_len), max_len) - floor_len) / (max_len - floor_len)
        return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))

    def cosine_length_reward(completions: list, answer: list, options: list | None = None, labels: list | None = None,
                             completion_ids: list | None = None, prompts: list | None = None,
                             **_: Any) -> list[float | None]:
        lengths = _lengths(completions, completion_ids, tokenizer)
        out: list[float | None] = []
        for i, completion in enumerate(completions):
            lab, opts = _row(i, options, labels)
            gold = _gold(answer[i], lab)
            text = completion_text(completion)
            if gold is None:
                out.append(None)
            elif not earns_quality(text, lab, opts, prompts[i] if prompts else None):
                out.append(floor)
            elif score(text, gold, lab, opts)[1]:
                out.append(cosine(lengths[i], max_value_correct, min_value_correct))
            else:
                out.append(cosine(lengths[i], min_value_wrong, max_value_wrong))
        return out

    return cosine_length_reward


def repetition(ngram_size: int = 3, max_penalty: float = -1.0, tolerance: float = 0.1) -> RewardFn:
    """Penalty in [max_penalty, 0] for repeated word n-grams, with a dead zone: the repeated share
    r = 1 - unique / total costs max_penalty * max(0, r - tolerance) / (1 - tolerance).
    Ill-formed completions, and reasoning that echoes the prompt, get max_penalty.

    The dead zone makes the penalty a guard, not a prize for variety: honest reasoning repeats a
    few phrases ("the patient's", an option's name); on the 163 seed cases its repeated share is
    at most 0.087 (0.043 without the seed's answer sentence), so at 0.1 none of it is penalised and
    a filler that never repeats gains nothing over it in an all-correct group, while padding
    (0.27-0.53 on the reward audit's cases) still pays."""
    if max_penalty > 0 or ngram_size < 1 or not 0 <= tolerance < 1:
        raise ValueError("max_penalty must be <= 0, ngram_size >= 1 and tolerance in [0, 1)")

    def repetition_reward(completions: list, options: list | None = None, labels: list | None = None,
                          prompts: list | None = None, **_: Any) -> list[float]:
        out = []
        for i, completion in enumerate(completions):
            lab, opts = _row(i, options, labels)
            text = completion_text(completion)
            if not earns_quality(text, lab, opts, prompts[i] if prompts else None):
                out.append(max_penalty)
                continue
            grams = _ngrams(_words(text), ngram_size)
            repeated = 1.0 - len(set(grams)) / len(grams) if grams else 0.0
            out.append(max_penalty * max(0.0, repeated - tolerance) / (1.0 - tolerance))
        return out

    return repetition_reward


_CLINICAL_CUES = (
    "finding", "history", "exam", "differential", "diagnos", "most likely", "rule out", "risk", "probability",
    "mechanism", "pathophysiolog", "management", "treatment", "contraindicat", "comorbid", "prognos",
    "evidence", "next step", "first-line", "therefore", "because",
)


def clinical_structure(target_steps: int = 3, target_cues: int = 4, echo_threshold: float = ECHO_THRESHOLD) -> RewardFn:
    """Score in [0, 1] for structured clinical reasoning: half for numbered steps (up to target_steps),
    half for distinct clinical-reasoning cues (up to target_cues). Zero for ill-formed completions and
    for reasoning that mostly echoes the prompt."""
    if target_steps < 1 or target_cues < 1:
        raise ValueError("target_steps and target_cues must be >= 1")

    def clinical_structure_reward(completions: list, prompts: list | None = None, options: list | None = None,
                                  labels: list | None = None, **_: Any) -> list[float]:
        out = []
        for i, completion in enumerate(completions):
            lab, opts = _row(i, options, labels)
            parsed = parse(completion_text(completion), lab, opts)
            prompt = prompt_text(prompts[i]) if prompts else ""
            if not parsed.well_formed or echoes_prompt(parsed.think, prompt, echo_threshold):
                out.append(0.0)
                continue
            steps = len(set(re.findall(r"(?m)^\s*(\d{1,2})[.)]\s+\S", parsed.think))
                        | set(re.findall(r"(?<![\d.])(\d{1,2})\.\s+[A-Z]", parsed.think)))
            lowered = parsed.think.lower()
            cues = sum(cue in lowered for cue in _CLINICAL_CUES)
            out.append(0.5 * min(1.0, steps / target_steps) + 0.5 * min(1.0, cues / target_cues))
        return out

    return clinical_structure_reward


# --- case_reasoning: what reasoning about *this* case looks like, measured on the words ----------
#
# Hand-written on purpose: no library scores "does this reasoning engage this question" cheaply
# enough to run on every rollout (a judge model does it well and slowly: see `judge`). The
# measure below is deliberately literal. Terms are the case's content words and values (stems of
# five letters, so "hypertension" meets "hypertensive"; numbers exactly; abbreviations such as ECG
# kept); boilerplate ("patient", "presents", "which", "most likely") is not a term.

_STOP = frozenset("""
about above after again against also although among another answer any appear appears around
because been before being below best between both cannot case cause caused change changes choice
clinical could days diagnosis does doing done during each either emergency every evaluation exam
examination explain false female finding findings first following found from further given going
have having here history hours important initial into later least less likely made make male
management many months more most much must next normal note only option options other over past
patient patients present presentation presents question rather reason reasoning recent regarding
reports result results same several should shows since some step such than that their them then
there these they this those three through time today treatment true twice under until upon very
visit weeks what when where whether which while will with within without would year years young
woman women female child girl boy days week month hour context think problem inside
final line letter followed give
features discriminating mechanism alternative alternatives consider conclusion differential
factors overall relevant evidence decision data
""".split())  # the last lines: the vocabulary of reasoning itself, chosen on honest data: words in at
# least 3 of the 240 seed reasonings and at least 4 times as often there as in the 240 seed
# questions (step headings such as "Differential", "Discriminating features", "Risk factors",
# "Conclusion"). Words that were here only because the reward audit's hack generators used them
# ("careful", "systematic", "candidates", "possibilities", ...) are not (issue 25).
# Words that make a clause a statement about something (relations, verbs of clinical reasoning,
# negation): reasoning interprets, a keyword list only names.
_RELATION = re.compile(
    r"\b(?:suggest\w*|indicat\w*|point\w*|consistent|inconsistent|explain\w*|because|due|caus\w*|reflect\w*|"
    r"favou?r\w*|argu\w*|against|support\w*|typical\w*|characteristic\w*|classic\w*|rul\w*|exclud\w*|"
    r"fit\w*|impl\w*|means?|therefore|thus|hence|so|makes?|unlikely|likely|would|could|should|rather|unlike|"
    r"whereas|but|however|absence|absent|not|no|without|lack\w*|requir\w*|warrant\w*|leads?|results?|"
    r"produc\w*|distinguish\w*|differentiat\w*|confirm\w*|since|give[sn]?|shows?|showing|leaves?|"
    r"follows?|extends?|occurs?|develops?|needs?|is|are|was|were|has|have|had|remains?|becomes?|treat\w*|"
    r"prevent\w*|reduc\w*|increas\w*|decreas\w*|raises?|lowers?|worsens?|improv\w*|precipitat\w*|"
    r"predict\w*|carr\w*|affects?|involv\w*|from|than|after|may|might|can|cannot|be|been)\b",
    re.IGNORECASE,
)
# Stems found in more than 7% of the 460 bundled seed questions: words most clinical questions share
# ("blood", "pressure", "pain", "left", small numbers). They ground a sentence in the case, but
# they do not show that the reasoning is about *this* case: another case's reasoning has them too.
_COMMON = frozenset("""
000 1 1.73 10 100 12 2 20 24 3 30 4 5 50 58 6 7 8 9 appropr blood cell chest chronic count creatin
ct daili develop diabet diseas egfr fever heart hemoglo high hyperte kidney left mild minut mmhg
mmol negat pain platele posit pressur rate receiv right risk score serum sever start symptom take
tempera test therapi type ultraso upper urin
""".split())
_TERM = re.compile(r"[A-Za-z][A-Za-z]*|\d+(?:\.\d+)?")
_LETTER_REF = re.compile(r"\b(?i:option|choice|answer)\s+\(?([A-J])\)?(?![A-Za-z0-9])")
_UNIT_SPLIT = re.compile(r"[.;!?:](?=\s|$)|\n+")


_ENGLISH = snowballstemmer.stemmer("english")


@functools.lru_cache(maxsize=65536)
def _stem(token: str) -> str | None:
    """A term's comparable form, or None for words that carry no case content: its Porter2 stem
    (the snowball stemmer, as search engines use), cut to seven letters ("hypertension" meets
    "hypertensive", "mediastinum" meets "mediastinal"; "hyperpigmentation" stays apart from
    "hyperaldosteronism"). Cached: a clinical vocabulary is small, and stemming is the slow part."""
    if token[0].isdigit():
        return token
    if 2 <= len(token) <= 5 and sum(c.isupper() for c in token) >= 2:
        return token.lower()  # ECG, CT, HIV, ACTH, hCG, eGFR
    low = token.lower()
    if len(low) < 4 or low in _STOP:
        return None
    return _ENGLISH.stemWord(low)[:7]


def _stems(text: str) -> set[str]:
    return {s for s in map(_stem, _TERM.findall(text)) if s}


@dataclass(frozen=True)
class _Case:
    terms: frozenset  # the case's own terms (its text, options and format instruction aside)
    specific: frozenset  # those not among the words most clinical questions share
    naming: dict  # letter -> terms that name that option (only it has them, the case does not)
    option_terms: dict  # letter -> all of that option's terms
    every_option: frozenset


@functools.lru_cache(maxsize=4096)
def _case(prompt: str, options: tuple[tuple[str, str], ...]) -> _Case:
    """What a question offers to reason about. Cached: a GRPO group shares its prompt."""
    text = prompt
    for k, v in options:  # the lettered option lines are not findings
        text = text.replace(f"{k}. {v}", " ")
    # The format instruction (the paragraph that asks for <think>) is not part of the case.
    text = "\n\n".join(p for p in text.split("\n\n") if "<think>" not in p)
    terms = frozenset(_stems(text))
    option_terms = {k: frozenset(_stems(v)) for k, v in options}
    # An option is named by terms only it has ("pericarditis", not the "acute" it shares, nor the
    # "eGFR" that the case itself states), or by all of its terms together ("primary adrenal
    # insufficiency" beside "secondary adrenal insufficiency" and "primary hyperaldosteronism").
    naming = {k: v - terms - frozenset().union(*(o for j, o in option_terms.items() if j != k))
              for k, v in option_terms.items()}
    every_option = frozenset().union(*option_terms.values()) if option_terms else frozenset()
    return _Case(terms, (terms - _COMMON) or terms, naming, option_terms, every_option)


def _user_turn(prompt: Any) -> str:
    """The question as the user put it: a system prompt is not part of the case."""
    if isinstance(prompt, list):
        return "\n\n".join(m["content"] for m in prompt if m.get("role") == "user")
    return prompt_text(prompt)


def _is_list(unit: str) -> bool:
    """A comma list of short items ("tearing pain, widened mediastinum, ST elevation"): names, no claim.
    A list that a predicate closes ("melena, hypotension or a falling hemoglobin would prompt
    admission") is a sentence."""
    parts = [p for p in unit.split(",") if p.strip()]
    return (len(parts) >= 3 and sum(len(p.split()) <= 3 for p in parts) * 3 >= len(parts) * 2
            and len(parts[-1].split()) <= 4)


def _units(think: str) -> list[str]:
    """Sentences and clauses of the reasoning (numbered-step markers dropped)."""
    return [u for u in (x.strip() for x in _UNIT_SPLIT.split(think)) if len(u.split()) >= 2]


def case_reasoning(target_findings: int = 6, target_interpreted: int = 3, target_weighed: int = 2,
                   grounded_share: float = 0.6, on_topic: float = 0.15, echo_threshold: float = ECHO_THRESHOLD,
                   saturate_at: float = 0.6) -> RewardFn:
    """Reasoning about this case, in [0, 1]; the floor (0) for ill-formed completions and echoes.

    A guard, not a graded prize: the measure s below is paid as min(1, s / `saturate_at`). Words
    cannot tell good reasoning from fluent filler about the case's terms, and a graded lexical
    score lets such filler outscore honest reasoning by a hair, which group-relative advantages
    then turn into the group's top advantage (issue 25). Saturated, everything that engages the
    case enough earns the same, so in a group that is all correct honest reasoning can be tied but
    not beaten by words; below the bar the score still ranks. 0.6: 97.5% of the 163 seed cases'
    full reasonings reach it (the rest score 0.36-0.59). Reasoning quality beyond this bar is the
    judge's to grade (`judge`, audited by `gazal rewards audit --judge`).

    Pays, on the reasoning block:
    - findings (0.30): distinct terms of this case's own text (findings, values, named things)
      that the reasoning interprets, up to `target_findings`;
    - interpretation (0.30): sentences that relate a case term (suggests, because, argues against,
      rules out ...) to an option or to knowledge beyond the case's words, up to `target_interpreted`;
    - weighing (0.25, multiple choice): options weighed, i.e. named in a claim that also holds a
      case term or brings knowledge of its own (two terms beyond the case's and options' words),
      up to `target_weighed`;
    - conclusion (0.15): the option finally chosen was weighed and is named in the last third of
      the reasoning (for yes/no questions: the last sentence relates a case term);
    yes/no questions have no options to weigh: there findings pay 0.35, interpretation 0.50 and
    the conclusion 0.15;
    all times min(1, share of sentences that touch the case or an option / `grounded_share`), so
    padding with sentences about nothing dilutes the whole score, and times min(1, share of the
    reasoning's own distinct terms that are this case's or its options' / `on_topic`), so reasoning
    written for another question scores little even where it shares this one's common words (on
    the 163 seed cases the honest reasoning's share is 0.15 or more for 90% of them; another
    case's reasoning reaches 0.07 for 90% of them, 0.17 at most).

    What earns the floor, and why: cue words and numbered steps that would fit any question
    (no case terms), another question's reasoning (its terms are not this case's), the options
    pasted or named without a finding, a keyword list (terms with no relation), the prompt copied
    back (`echo_threshold` of its trigrams). Paid regardless of correctness: accuracy pays that.
    """
    if min(target_findings, target_interpreted, target_weighed) < 1 or not 0 < grounded_share <= 1 \
            or not 0 < on_topic <= 1 or not 0 < saturate_at <= 1:
        raise ValueError("targets must be >= 1, grounded_share, on_topic and saturate_at in (0, 1]")

    def one(text: str, prompt: str, lab: list[str], opts: dict | None) -> float:
        parsed = parse(text, lab, opts)
        if not parsed.well_formed or echoes_prompt(parsed.think, prompt, echo_threshold):
            return 0.0
        case = _case(prompt, tuple((opts or {}).items()))
        units = _units(parsed.think)
        if not units or not case.terms:
            return 0.0
        interpreted, grounded, used, said = 0, 0, set(), set()
        weighed: set[str] = set()
        last_named: dict[str, int] = {}
        for i, unit in enumerate(units):
            stems = _stems(unit)
            # What the clause says beyond relation words: "the tearing pain suggests the diagnosis"
            # says "tearing", "pain".
            plain = _stems(_RELATION.sub(" ", unit))
            earlier, said = said, said | plain
            letters = _LETTER_REF.findall(unit)
            # Named by its words; "option B" alone names it for the conclusion, but weighing an
            # option takes its words (a letter carries no claim about it).
            named = [k for k, t in case.naming.items()
                     if stems & t or (case.option_terms[k] and case.option_terms[k] <= stems)]
            for k in named + letters:
                last_named[k] = i
            grounded += bool(stems & case.terms) or bool(named) or bool(letters)
            if _is_list(unit) or not (_RELATION.search(unit) or len(unit.split()) >= 5):
                continue  # names things (a list, a heading), claims nothing
            # What it brings beyond the case's and the options' own words ("the tearing pain suggests
            # the diagnosis": nothing), and what of that no earlier sentence said: a template that
            # pins the same filler ("... suggests a serious underlying condition") to one finding
            # after another interprets once.
            knowledge = {t for t in plain - case.terms - case.every_option if not t[0].isdigit()}
            new = knowledge - earlier  # numbers are values, not knowledge: "suggests 41" says nothing
            if stems & case.specific and new:
                interpreted += 1
                used |= stems & case.specific
            # An option is weighed when a claim about it meets the case's findings (words beyond the
            # option's own, so a pasted option is not a claim; not a bare number, so "34, 50 and 41
            # are the candidates" is not either) or brings knowledge of its own ("myocarditis
            # follows a viral prodrome"), and says something no earlier sentence did.
            own = frozenset().union(*(case.option_terms[k] for k in named)) if named else frozenset()
            findings_beyond = {t for t in (stems & case.specific) - own if not t[0].isdigit()}
            if named and (findings_beyond or len(knowledge) >= 2) and (new or findings_beyond - earlier):
                weighed.update(named)
        findings = min(1.0, len(used) / min(target_findings, len(case.specific)))
        interpretation = min(1.0, interpreted / target_interpreted)
        if opts:
            chosen = answer_statements(parsed.after, lab, opts)[-1].extraction.label
            weighing = min(1.0, len(weighed) / min(target_weighed, len(opts)))
            # The conclusion follows when the option chosen was weighed and is where the
            # reasoning ends up (named in its last third).
            conclusion = float(chosen in weighed and last_named[chosen] >= len(units) * 2 / 3 - 1)
            score = 0.30 * findings + 0.30 * interpretation + 0.25 * weighing + 0.15 * conclusion
        else:
            last = _stems(units[-1]) & case.terms and _RELATION.search(units[-1])
            score = 0.35 * findings + 0.50 * interpretation + 0.15 * (1.0 if last else 0.0)
        own_terms = said - _COMMON
        topical = len(own_terms & (case.specific | case.every_option)) / len(own_terms) if own_terms else 0.0
        score *= min(1.0, grounded / len(units) / grounded_share) * min(1.0, topical / on_topic)
        return min(1.0, score / saturate_at)

    def case_reasoning_reward(completions: list, prompts: list | None = None, options: list | None = None,
                              labels: list | None = None, **_: Any) -> list[float]:
        out = []
        for i, completion in enumerate(completions):
            lab, opts = _row(i, options, labels)
            out.append(one(completion_text(completion), _user_turn(prompts[i]) if prompts else "", lab, opts))
        return out

    return case_reasoning_reward


def overlong(cache: int = 64, max_completion_length: int = 256, tokenizer=None) -> RewardFn:
    """DAPO soft overlong punishment in [-1, 0]: 0 up to max_completion_length - cache tokens, then a
    linear ramp to -1 at the limit (and -1 beyond)."""
    if cache <= 0 or cache >= max_completion_length:
        raise ValueError("cache must be positive and below max_completion_length")

    def overlong_reward(completions: list, completion_ids: list | None = None, **_: Any) -> list[float]:
        out = []
        for length in _lengths(completions, completion_ids, tokenizer):
            start = max_completion_length - cache
            out.append(0.0 if length <= start else max(-1.0, (start - length) / cache))
        return out

    return overlong_reward


def judge(base_url: str, model: str, rubric: str | None = None, timeout_s: float = 60.0, concurrency: int = 8,
          max_retries: int = 2, cache_path: str | None = None, api_key_env: str = DEFAULT_API_KEY_ENV,
          max_tokens: int = 512, temperature: float = 0.0) -> RewardFn:
    """Reasoning quality in [0, 1] from an LLM judge (gazal.judge) behind an OpenAI-compatible endpoint:
    the rubric (default templates/judge/reasoning.md) asks whether the reasoning discriminates between
    the options, asserts what is medically true, supports the final answer and is about this case.
    Ill-formed completions, and reasoning that echoes the prompt, get the floor 0.0 without a request,
    so dropping the format can never buy a better grade. A timeout, HTTP or connection error or a
    malformed reply is None, never 0 (in GRPO it then takes its group's mean: grpo.neutral_skips). The key comes only from $api_key_env. Logs
    gazal/judge_failures and gazal/judge_cache_hits (counts in this batch)."""
    grader = Judge(base_url, model, rubric, timeout_s=timeout_s, concurrency=concurrency, max_retries=max_retries,
                   cache_path=cache_path, api_key_env=api_key_env, max_tokens=max_tokens, temperature=temperature)

    def judge_reward(completions: list, prompts: list | None = None, options: list | None = None,
                     labels: list | None = None, log_metric: Callable | None = None, **_: Any) -> list[float | None]:
        out: list[float | None] = [0.0] * len(completions)
        asked, requests = [], []
        for i, completion in enumerate(completions):
            lab, opts = _row(i, options, labels)
            text, prompt = completion_text(completion), prompts[i] if prompts else None
            if earns_quality(text, lab, opts, prompt):
                parsed = parse(text, lab, opts)
                asked.append(i)
                requests.append(JudgeRequest(prompt_text(prompt), parsed.think.strip(), parsed.after.strip()))
        for i, value in zip(asked, grader.grade(requests) if requests else []):
            out[i] = value
        if log_metric:
            log_metric("gazal/judge_failures", float(sum(out[i] is None for i in asked)))
            log_metric("gazal/judge_cache_hits", float(grader.last_batch["cache_hits"] if requests else 0))
        return out

    judge_reward.judge = grader  # counters and cache, for tests and tools
    return judge_reward


REWARDS: dict[str, Callable[..., RewardFn]] = {
    "accuracy": accuracy,
    "format": format_,
    "cosine_length": cosine_length,
    "repetition": repetition,
    "clinical_structure": clinical_structure,
    "case_reasoning": case_reasoning,
    "overlong": overlong,
    "judge": judge,
}


def resolve_reward(name: str, params: Mapping[str, Any] | None = None, tokenizer=None,
                   max_completion_length: int | None = None) -> RewardFn:
    """Build a reward function from a registered name or 'package.module:function'.

    `tokenizer` and `max_completion_length` are passed to factories that declare them (unless the
    recipe sets them), so token-based rewards measure what the trainer generates.
    """
    params = dict(params or {})
    if name in REWARDS:
        factory = REWARDS[name]
    elif ":" in name:
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise GazalError(f"cannot import reward {name!r} ({exc})") from None
    else:
        raise GazalError(f"unknown reward {name!r} (known: {', '.join(REWARDS)}; or 'package.module:function')")
    accepted = inspect.signature(factory).parameters
    if "tokenizer" in accepted and "tokenizer" not in params:
        params["tokenizer"] = tokenizer
    if "max_completion_length" in accepted and "max_completion_length" not in params and max_completion_length:
        params["max_completion_length"] = max_completion_length
    fn = factory(**params)
    fn.__name__ = name.split(":")[-1]  # TRL logs rewards/<__name__>/mean
    return fn


@dataclass
class RewardSet:
    """A recipe's reward components with their weights, scored the way the trainer combines them."""

    names: list[str]
    weights: list[float]
    functions: list[RewardFn]

    @classmethod
    def from_recipe(cls, recipe, tokenizer=None) -> RewardSet:
        specs = recipe.grpo.rewards
        fns = [resolve_reward(s.name, s.params, tokenizer, recipe.grpo.max_completion_length) for s in specs]
        return cls([fn.__name__ for fn in fns], [s.weight for s in specs], fns)

    def score(self, completions: list, answer: list, options: list | None = None, labels: list | None = None,
              prompts: list | None = None, completion_ids: list | None = None) -> list[dict[str, Any]]:
        """Per completion: each component's value and `total`, the weighted sum of the non-None values
        (TRL's sum before it normalises; without `only_when_accuracy_varies`, which needs a group, and
        without `normalize_then_sum`: so the totals rank completions by what each earns alone)."""
        columns = {"answer": answer, "options": options, "labels": labels, "prompts": prompts,
                   "completion_ids": completion_ids}
        values = [fn(completions=completions, **columns) for fn in self.functions]
        rows = []
        for i in range(len(completions)):
            rewards = {name: vals[i] for name, vals in zip(self.names, values)}
            total = sum(w * v for w, v in zip(self.weights, rewards.values()) if v is not None)
            rows.append({"rewards": rewards, "total": total})
        return rows
