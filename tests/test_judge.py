"""Hand-checked cases for the SQuAD 2.0 judge (regift_jax/traces/judge.py).

Every expected number below was worked out by hand from the definitions in the official
evaluate-v2.0.py (normalise: lower, drop ASCII punctuation, drop a/an/the, collapse whitespace;
token-bag F1; max over golds; empty prediction = no-answer) and from the lenient rule documented in
the module.  The arithmetic is in the comment of each case.
"""

import pytest

from regift_jax.traces import judge as J

# (prediction, gold answers, exact_match, f1, lenient_correct, abstained)
CASES = [
    # 1 articles: "the eiffel tower" -> "eiffel tower"
    ("the Eiffel Tower", ["Eiffel Tower"], 1.0, 1.0, True, False),
    # 2 articles on both sides: "a cat" -> "cat", "the cat" -> "cat"
    ("A cat", ["the cat"], 1.0, 1.0, True, False),
    # 3 articles are whole words only: "theatre" keeps its "the"; tokens [theatre] vs [atre]: 0
    ("Theatre", ["the atre"], 0.0, 0.0, False, False),
    # 4 punctuation deleted without a space: "u.s.a." -> "usa"
    ("U.S.A.", ["USA"], 1.0, 1.0, True, False),
    # 5 hyphen deleted, not split: [saintdenis] vs [saint, denis]: no common token
    ("Saint-Denis", ["Saint Denis"], 0.0, 0.0, False, False),
    # 6 order of steps: punctuation before articles, "The-End" -> "theend" (not "end")
    ("The-End", ["end"], 0.0, 0.0, False, False),
    # 7 whitespace collapsed, case folded
    ("  NEW   york\n", ["New York"], 1.0, 1.0, True, False),
    # 8 Unicode quotes are not in string.punctuation: [“paris”] vs [paris]
    ("\u201cParis\u201d", ["Paris"], 0.0, 0.0, False, False),
    # 9 multiple golds, max: second gold is an exact match
    ("Denver Broncos", ["Broncos", "Denver Broncos", "the Denver Broncos team"], 1.0, 1.0, True,
     False),
    # 10 F1: pred [in, 10th, century], gold [10th, century]; common 2, P 2/3, R 1 -> 0.8
    ("in the 10th century", ["10th century"], 0.0, 0.8, True, False),
    # 11 F1: pred [normans, from, normandy], gold [normans]; P 1/3, R 1 -> 0.5
    ("Normans from Normandy", ["the Normans"], 0.0, 0.5, True, False),
    # 12 F1 counts multiplicity: pred [red, red, blue], gold [red, green]; common 1,
    #    P 1/3, R 1/2 -> 2*(1/6)/(5/6) = 0.4; lenient: [red, green] not a run of the prediction
    ("red red blue", ["red green"], 0.0, 0.4, False, False),
    # 13 max over golds of partial F1: gold [paris]: P 1/2 R 1 -> 2/3; gold [france, capital,
    #    paris]: common 2, P 1, R 2/3 -> 0.8; max 0.8
    ("Paris France", ["Paris", "France capital Paris"], 0.0, 0.8, True, False),
    # 14 F1 + lenient containment: pred [capital, of, france, is, paris], gold [paris];
    #    P 1/5, R 1 -> 1/3
    ("The capital of France is Paris.", ["Paris"], 0.0, 1 / 3, True, False),
    # 15 stopword removal makes the gold a run: gold [10th, century] after dropping "in";
    #    pred [happened, 10th, century] after dropping "it", "during".
    #    F1: gold [in, 10th, century], pred [it, happened, during, 10th, century]; common 2,
    #    P 2/5, R 2/3 -> (8/15)/(16/15) = 0.5
    ("It happened during 10th century", ["in the 10th century"], 0.0, 0.5, True, False),
    # 16 token containment, not characters: [1990] does not contain [1]; F1 0
    ("It was 1990", ["1"], 0.0, 0.0, False, False),
    # 17 gold made only of stopwords is compared without stopword removal: [he] not in
    #    [she, did, it]
    ("she did it", ["he"], 0.0, 0.0, False, False),
    # 18 ... and found when present: [he] in [he, did]; F1 P 1/2 R 1 -> 2/3
    ("he did", ["he"], 0.0, 2 / 3, True, False),
    # 19 unanswerable, empty prediction: the official no-answer; never lenient-correct
    ("", [], 1.0, 1.0, False, True),
    # 20 unanswerable, the prompt's abstention
    ("Not in background.", [], 1.0, 1.0, True, True),
    # 21 unanswerable, a synonym (after normalisation "cant answer" == "cant answer")
    ("Can't answer", [], 1.0, 1.0, True, True),
    # 22 unanswerable, "Unknown"
    ("Unknown", [], 1.0, 1.0, True, True),
    # 23 unanswerable, a sentence that mentions an abstention: strictly a (wrong) answer,
    #    leniently an abstention
    ("It cannot be determined from the context.", [], 0.0, 0.0, True, False),
    # 24 unanswerable, wrong answer
    ("Paris", [], 0.0, 0.0, False, False),
    # 25 unanswerable after the official drop of golds that normalise to "": ["."] -> no gold
    ("not in the background", ["."], 1.0, 1.0, True, True),
    # 26 answerable, abstention: scores 0, but abstained is reported
    ("Not in background", ["Paris"], 0.0, 0.0, False, True),
    # 27 answerable, empty prediction: F1 0 (one side empty, they disagree)
    ("", ["Paris"], 0.0, 0.0, False, True),
    # 28 gold is itself an abstention (authors' synonym rule): any abstaining prediction is
    #    lenient-correct; strict: [cannot, be, determined] vs [unknown] -> 0
    ("Cannot be determined", ["Unknown"], 0.0, 0.0, True, True),
    # 29 authors' extraction phrases count as abstentions too
    ("The question is unanswerable.", [], 0.0, 0.0, True, False),
]


@pytest.mark.parametrize("pred,golds,em,f1,lenient,abstained", CASES)
def test_hand_checked_cases(pred, golds, em, f1, lenient, abstained):
    j = J.judge(pred, golds)
    assert j.exact_match == em
    assert j.f1 == pytest.approx(f1, abs=1e-12)
    assert j.lenient_correct is lenient
    assert j.abstained is abstained


def test_case_table_is_large_enough():
    assert len(CASES) >= 20


def test_official_normalisation_function():
    assert J.normalize_answer("  The  Quick, brown fox!  ") == "quick brown fox"
    assert J.normalize_answer("An apple a day") == "apple day"
    assert J.normalize_answer("Can't") == "cant"
    assert J.get_tokens("") == []
    assert J.compute_exact("", "") == 1
    assert J.compute_f1("", "") == 1.0
    assert J.compute_f1("", "x") == 0.0


def test_stopword_list_is_nltk_english_179():
    sw = J.ENGLISH_STOPWORDS
    assert len(sw) == 179
    assert {"not", "in", "be", "can", "no", "the", "of", "during"} <= sw
    # Content words the abstention phrases rely on are not stopwords.
    assert not {"cannot", "unknown", "background", "enough", "answer"} & sw


def test_stopword_removal_is_what_makes_case_15_lenient():
    pred, gold = "It happened during 10th century", ["in the 10th century"]
    assert J.judge(pred, gold).lenient_correct
    assert not J.judge(pred, gold, stopwords=frozenset()).lenient_correct


def test_substring_mode_reproduces_authors_character_test():
    # [1] is not a token run of [1990], but "1" is a substring of "1990".
    assert not J.judge("It was 1990", ["1"]).lenient_correct
    assert J.judge("It was 1990", ["1"], containment="substring").lenient_correct
    with pytest.raises(ValueError, match="containment"):
        J.judge("x", ["x"], containment="chars")


def test_abstention_phrases_are_a_knob():
    assert J.judge("Not in background", []).lenient_correct
    j = J.judge("Not in background", [], abstention_phrases=("unknown",))
    assert (j.exact_match, j.lenient_correct, j.abstained) == (0.0, False, False)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="gold_answers must be a list"):
        J.judge("Paris", "Paris")
    with pytest.raises(TypeError, match="prediction must be str"):
        J.judge(None, ["Paris"])
    with pytest.raises(TypeError, match="gold answers must be str"):
        J.judge("Paris", [None])
