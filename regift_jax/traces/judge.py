"""Correctness of a teacher's answer against SQuAD 2.0 gold answers.

ReGiFT keeps only the teacher traces whose final answer is correct, so this judge decides what the
students are trained on.  It reports two verdicts side by side:

Strict (the official SQuAD 2.0 metric, ``evaluate-v2.0.py``)
    ``normalize_answer``: lower-case, delete ASCII punctuation (``string.punctuation``; curly
    quotes and other Unicode punctuation are kept, as in the official script), delete the words
    *a*, *an*, *the*, collapse whitespace — in that order, so ``"The-End"`` becomes ``"theend"``.
    Exact match is equality of normalised strings; F1 is the bag-of-tokens overlap of the
    normalised strings.  Both take the max over the gold answers.  Gold answers that normalise to
    the empty string are dropped; a question with no gold left is unanswerable and its only gold is
    ``""``.  In the official script the empty prediction *is* the no-answer prediction: it scores
    1 against ``""`` and 0 against any real answer.

    Our mapping of abstentions: generative models answer "Not in background" rather than
    nothing.  A prediction whose *whole* normalised text is empty or equals a normalised
    abstention phrase (``DEFAULT_ABSTENTION_PHRASES``; e.g. ``"Not in background."``,
    ``"Unknown"``, ``"Can't answer"``) is scored as the empty prediction on unanswerable questions
    (EM = F1 = 1) and ``abstained`` is set.  On answerable questions the prediction is scored as
    written (an abstention then scores 0 unless a gold answer is literally that phrase).  A
    sentence that merely *mentions* an abstention ("It cannot be determined from the context") is
    not a strict no-answer.

Paper-lenient (the rule the paper describes: containment after stopword removal)
    Answerable: correct iff, for some gold answer, the gold's tokens — normalised as above and with
    English stopwords (:data:`ENGLISH_STOPWORDS`) removed — occur as a contiguous run in the
    prediction's tokens normalised the same way.  If a gold answer is itself an abstention phrase,
    any prediction that mentions an abstention is correct (the authors' synonym rule).
    Unanswerable: correct iff the prediction mentions an abstention phrase (as a contiguous token
    run of the normalised prediction; stopwords are *not* removed here, since "not", "in", "be" are
    stopwords).  An empty prediction is never lenient-correct (it is usually a parse failure).

How the authors did it, and where we differ
    scripts/extract_reasoning_traces.py (is_answer_correct / main) in the authors' repository
    (public fork varsharamineni/Reasoing-Towards-Fairness, commit 6a322a4):

    * Normalisation = the SQuAD steps + NLTK's English stopword list (downloaded at run time).
      Ours: the same 179-word list is written out below; no download.
    * Containment was a *character* substring test on the joined normalised strings, so gold
      ``"1"`` matches ``"1990"`` and a gold made only of stopwords (``"he"``) normalises to ``""``,
      which is contained in every non-empty prediction.  Ours: contiguous *token* containment, and
      a gold that stopword removal empties is compared without stopword removal (on both sides).
      ``containment="substring"`` restores the authors' character test.
    * Their synonym test ran on stopword-stripped text, where "not in background" has become
      "background" and "cannot be determined" has become "cannot determined"; only "unknown",
      "undetermined" and "cannot answer" could still match.  Ours matches synonyms on text without
      stopword removal.
    * Unanswerable questions never reached the synonym list: a trace was kept only if the answer
      contained "unanswerable", "cannot be answered" or "no answer" (raw lower-cased text) — not
      "not in background", the phrase their prompt asked for.  Ours accepts the paper's synonyms
      plus those three phrases (``DEFAULT_ABSTENTION_PHRASES``).
    * Their answer extraction missed the teacher's prefilled ``<think>`` (see
      :mod:`regift_jax.core.prompts`); that is the parser's concern, not the judge's.

All lists are arguments of :func:`judge` (``abstention_phrases``, ``stopwords``) so a run can
change them; the defaults are module constants.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import string
from typing import FrozenSet, Iterable, List, Sequence, Tuple

# The paper's unknown synonyms (also the authors' not_in_background_synonyms plus "not in
# background", which the paper lists).
UNKNOWN_SYNONYMS: Tuple[str, ...] = (
    "unknown", "cannot be determined", "can't be determined", "not answerable", "not known",
    "not enough info", "not enough information", "cannot answer", "can't answer", "undetermined",
    "not in background",
)
# Phrases the authors' extraction script accepted for unanswerable SQuAD questions.
EXTRACTION_ABSTENTIONS: Tuple[str, ...] = ("unanswerable", "cannot be answered", "no answer")
DEFAULT_ABSTENTION_PHRASES: Tuple[str, ...] = UNKNOWN_SYNONYMS + EXTRACTION_ABSTENTIONS

# NLTK's English stopword list (nltk_data corpora/stopwords/english, the 179-word version the
# authors' scripts loaded with stopwords.words('english')).  Entries with an apostrophe can never
# match: punctuation is removed before stopwords, so "don't" arrives as "dont".
ENGLISH_STOPWORDS: FrozenSet[str] = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself
yourselves he him his himself she she's her hers herself it it's its itself they them their
theirs themselves what which who whom this that that'll these those am is are was were be been
being have has had having do does did doing a an the and but if or because as until while of at
by for with about against between into through during before after above below to from up down
in out on off over under again further then once here there when where why how all any both each
few more most other some such no nor not only own same so than too very s t can will just don
don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn
doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn
needn't shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't
""".split())

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


# -- the official SQuAD 2.0 definitions ---------------------------------------------------------

def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (evaluate-v2.0.py)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def get_tokens(s: str) -> List[str]:
    return normalize_answer(s).split() if s else []


def compute_exact(a_gold: str, a_pred: str) -> int:
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    gold_toks, pred_toks = get_tokens(a_gold), get_tokens(a_pred)
    if not gold_toks or not pred_toks:
        # If either is no-answer, F1 is 1 if they agree and 0 otherwise.
        return float(gold_toks == pred_toks)
    num_same = sum((collections.Counter(gold_toks) & collections.Counter(pred_toks)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


# -- abstentions and lenient matching -----------------------------------------------------------

def _contains_run(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    n = len(needle)
    if n == 0:
        return False
    return any(list(haystack[i:i + n]) == list(needle) for i in range(len(haystack) - n + 1))


def _normalized_phrases(phrases: Iterable[str]) -> List[List[str]]:
    out = [normalize_answer(p).split() for p in phrases]
    return [p for p in out if p]


def is_abstention(prediction: str,
                  abstention_phrases: Sequence[str] = DEFAULT_ABSTENTION_PHRASES) -> bool:
    """The whole prediction is a no-answer: empty after normalisation, or an abstention phrase."""
    toks = normalize_answer(prediction).split()
    return not toks or toks in _normalized_phrases(abstention_phrases)


def mentions_abstention(prediction: str,
                        abstention_phrases: Sequence[str] = DEFAULT_ABSTENTION_PHRASES) -> bool:
    """Some abstention phrase occurs as a contiguous token run of the normalised prediction."""
    toks = normalize_answer(prediction).split()
    return any(_contains_run(toks, p) for p in _normalized_phrases(abstention_phrases))


def lenient_tokens(s: str, stopwords: FrozenSet[str] = ENGLISH_STOPWORDS) -> List[str]:
    """SQuAD normalisation followed by stopword removal."""
    return [t for t in normalize_answer(s).split() if t not in stopwords]


def lenient_contains(prediction: str, gold: str, *,
                     stopwords: FrozenSet[str] = ENGLISH_STOPWORDS,
                     containment: str = "tokens") -> bool:
    """Gold contained in prediction after normalisation and stopword removal.

    A gold that stopword removal empties is compared without stopword removal on both sides; a
    gold that SQuAD normalisation empties is never contained.
    """
    if containment not in ("tokens", "substring"):
        raise ValueError(f"containment must be 'tokens' or 'substring', got {containment!r}")
    gold_toks = lenient_tokens(gold, stopwords)
    pred_toks = lenient_tokens(prediction, stopwords)
    if not gold_toks:
        gold_toks = normalize_answer(gold).split()
        pred_toks = normalize_answer(prediction).split()
    if not gold_toks or not pred_toks:
        return False
    if containment == "substring":
        return " ".join(gold_toks) in " ".join(pred_toks)
    return _contains_run(pred_toks, gold_toks)


# -- the judge ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Judgement:
    """exact_match and f1 in [0, 1] (official SQuAD 2.0, with abstentions mapped to no-answer);
    lenient_correct: the paper-lenient verdict; abstained: the whole prediction is a no-answer
    (empty or an abstention phrase)."""

    exact_match: float
    f1: float
    lenient_correct: bool
    abstained: bool


def judge(prediction: str, gold_answers: Sequence[str], *,
          abstention_phrases: Sequence[str] = DEFAULT_ABSTENTION_PHRASES,
          stopwords: FrozenSet[str] = ENGLISH_STOPWORDS,
          containment: str = "tokens") -> Judgement:
    """Judge one extracted answer against a SQuAD 2.0 question's gold answer texts.

    Args:
      prediction: the model's final answer (already extracted from the trace).
      gold_answers: the gold answer texts; empty for unanswerable questions.
      abstention_phrases: phrases that count as "no answer" (see module docstring).
      stopwords: words removed for the lenient rule.
      containment: ``"tokens"`` (ours) or ``"substring"`` (the authors' character test).
    """
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be str, got {type(prediction).__name__}")
    if isinstance(gold_answers, (str, bytes)) or not isinstance(gold_answers, Iterable):
        raise TypeError("gold_answers must be a list of answer strings, got "
                        f"{type(gold_answers).__name__} {gold_answers!r:.60}")
    gold_answers = list(gold_answers)
    for g in gold_answers:
        if not isinstance(g, str):
            raise TypeError(f"gold answers must be str, got {type(g).__name__} {g!r:.60}")

    golds = [g for g in gold_answers if normalize_answer(g)]
    abstained = is_abstention(prediction, abstention_phrases)

    if not golds:  # unanswerable: the only gold is the empty answer
        score = 1.0 if abstained else 0.0
        lenient = mentions_abstention(prediction, abstention_phrases)
        return Judgement(exact_match=score, f1=score, lenient_correct=lenient,
                         abstained=abstained)

    em = float(max(compute_exact(g, prediction) for g in golds))
    f1 = max(compute_f1(g, prediction) for g in golds)
    lenient = False
    if normalize_answer(prediction):
        pred_abstains = mentions_abstention(prediction, abstention_phrases)
        for g in golds:
            if pred_abstains and mentions_abstention(g, abstention_phrases):
                lenient = True
                break
            if lenient_contains(prediction, g, stopwords=stopwords, containment=containment):
                lenient = True
                break
    return Judgement(exact_match=em, f1=f1, lenient_correct=lenient, abstained=abstained)
