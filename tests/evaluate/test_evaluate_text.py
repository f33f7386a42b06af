import pytest

from kdkit.evaluate.text import answer_quality, exact_match, normalize, rouge_l, token_f1


def test_normalize_drops_case_punctuation_and_articles():
    assert normalize("The  Blue, sky!") == "blue sky"


def test_exact_match_and_f1():
    assert exact_match("The answer.", "answer") == 1.0
    assert token_f1("red blue", "blue green") == pytest.approx(0.5)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_rouge_l_is_the_lcs_f_measure():
    # LCS of "a b c d" and "a c d e" is "a c d": P = 3/4, R = 3/4
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert rouge_l("x y", "z") == 0.0
    assert rouge_l("Same Words", "same words") == 1.0


def test_answer_quality_is_a_mean_in_percent():
    q = answer_quality(["blue", "red"], ["blue", "green"])
    assert q == {"rouge_l": 50.0, "exact_match": 50.0, "f1": 50.0}
