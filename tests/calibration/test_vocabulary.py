"""calibration/vocabulary.py: token counts against a hand count with MiniLM's WordPiece tokenizer,
the kept vocabulary and the out-of-vocabulary rate worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.text import TokenizedSet
from calibration.vocabulary import choose_vocabulary, count_tokens, oov_rate, special_token_ids
from tests.models import minilm_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


def test_count_tokens_matches_a_hand_count(tokenizer):
    cls, sep, the, cat = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]", "the", "cat"])
    counts = count_tokens(["the cat the", "Cat"], tokenizer)  # uncased: "Cat" is "cat"
    assert counts.shape == (30522,) and counts.dtype == np.int64
    expected = np.zeros(30522, dtype=np.int64)
    expected[[cls, sep, the, cat]] = [2, 2, 2, 2]
    np.testing.assert_array_equal(counts, expected)

    # truncated to 3 tokens: [CLS] the [SEP] and [CLS] cat [SEP]
    short = count_tokens(["the cat the", "Cat"], tokenizer, max_length=3)
    expected[[the, cat]] = [1, 1]
    np.testing.assert_array_equal(short, expected)
    assert not count_tokens([], tokenizer).any()


def test_count_tokens_covers_added_tokens(tokenizer):
    import copy

    extended = copy.deepcopy(tokenizer)
    extended.add_tokens(["zzqxtoken"])
    counts = count_tokens(["zzqxtoken"], extended)
    assert counts.shape == (30523,) and counts[30522] == 1 and counts.sum() == 3  # with [CLS], [SEP]


def test_special_token_ids_are_minilms_five(tokenizer):
    names = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert special_token_ids(tokenizer) == sorted(tokenizer.convert_tokens_to_ids(names))
    assert special_token_ids(tokenizer) == [0, 100, 101, 102, 103]


DOMAIN = np.array([0, 3, 1, 5, 0, 2, 0, 0])
GENERAL = np.array([0, 0, 4, 0, 9, 0, 4, 4])


@pytest.mark.parametrize("keep_top, expected", [
    (0, [0, 1, 3, 5]),  # count >= 2: ids 1, 3, 5; special: 0
    (1, [0, 1, 3, 4, 5]),  # general's most frequent: id 4 (9)
    (2, [0, 1, 2, 3, 4, 5]),  # then the tie at 4 among ids 2, 6, 7: the lowest, 2
    (3, [0, 1, 2, 3, 4, 5, 6]),
    (10, [0, 1, 2, 3, 4, 5, 6, 7]),  # ids never seen in the general text are not added
])
def test_choose_vocabulary_by_hand(keep_top, expected):
    kept = choose_vocabulary(DOMAIN, 2, [0], GENERAL if keep_top else None, keep_top)
    assert kept.dtype == np.int64
    assert kept.tolist() == expected


def test_choose_vocabulary_min_count_and_specials():
    assert choose_vocabulary(DOMAIN, 1, []).tolist() == [1, 2, 3, 5]
    assert choose_vocabulary(DOMAIN, 4, [7, 0, 7]).tolist() == [0, 3, 7]  # specials kept, unseen
    assert choose_vocabulary(DOMAIN, 6, [6]).tolist() == [6]


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_count=0), "min_count"),
    (dict(keep_top=-1), "keep_top"),
    (dict(keep_top=2), "general_counts"),
    (dict(keep_top=2, general_counts=np.ones(3)), "shape"),
    (dict(special_ids=[8]), "outside"),
])
def test_choose_vocabulary_refuses_bad_arguments(kwargs, message):
    args = dict(domain_counts=DOMAIN, min_count=1, special_ids=[0]) | kwargs
    with pytest.raises(ValueError, match=message):
        choose_vocabulary(**args)


def test_oov_rate_by_hand():
    tokens = TokenizedSet([np.array([1, 2, 3]), np.array([4, 1])], None, 0, "k")
    assert oov_rate(tokens, np.array([1, 2])) == pytest.approx(2 / 5)  # 3 and 4 are out
    assert oov_rate(tokens, np.array([1, 2, 3, 4])) == 0.0
    assert oov_rate(tokens, np.array([9])) == 1.0
    assert oov_rate(TokenizedSet([], None, 0, "k"), np.array([1])) == 0.0
