import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from diffcurate.demo.corpus import DIGIT_WORDS, CorpusFormat, build_demo_corpus, digit_samples
from diffcurate.ingest.sources import open_source


def test_digits_are_the_real_images_with_label_captions_and_groups():
    samples, planted = digit_samples(n_duplicated=10, copies=30, seed=0)
    digits = load_digits()
    assert len(samples) == 1797 + 10 * 29
    first = samples[0]
    pixels = np.asarray(Image.open(__import__("io").BytesIO(first.image)))
    np.testing.assert_array_equal(pixels, np.round(digits.images[0] * 255 / 16).astype(np.uint8))
    for s, label in zip(samples[:1797], digits.target, strict=True):
        assert DIGIT_WORDS[label] in s.caption and s.metadata["label"] == label
    strokes = Counter(s.metadata["stroke"] for s in samples[:1797])
    assert set(strokes) == {"thin", "medium", "thick"} and min(strokes.values()) > 500
    assert set(Counter(s.metadata["slant"] for s in samples[:1797])) == {"left", "upright", "right"}
    # Each planted image appears exactly `copies` times, byte-identical.
    by_bytes = Counter(s.image for s in samples)
    planted_bytes = {s.image for s in samples if s.key in planted}
    assert len(planted) == 10 and all(by_bytes[b] >= 30 for b in planted_bytes)


def test_seed_changes_the_planted_set():
    assert digit_samples(seed=0)[1] != digit_samples(seed=1)[1]


@pytest.mark.parametrize("fmt", list(CorpusFormat))
def test_every_format_reads_back_the_same_corpus(tmp_path, fmt):
    corpus = build_demo_corpus(tmp_path, fmt, n_duplicated=2, copies=3)
    recs = list(open_source(corpus.path))
    assert len(recs) == corpus.n_samples == 1797 + 2 * 2
    assert all(r.reason is None for r in recs)
    planted = json.loads((tmp_path / "planted.json").read_text())
    assert planted["planted_keys"] == corpus.planted_keys


def test_heldout_digits_are_left_out_of_training_and_never_planted(tmp_path):
    corpus = build_demo_corpus(tmp_path, CorpusFormat.MANIFEST, n_duplicated=3, copies=4,
                               n_heldout=50)  # fmt: skip
    train = list(open_source(corpus.path))
    held = list(open_source(corpus.heldout_path))
    assert corpus.n_heldout == len(held) == 50
    assert len(train) == corpus.n_samples == 1797 - 50 + 3 * 3
    held_keys, train_keys = {r.key for r in held}, {r.key for r in train}
    assert not held_keys & train_keys and not held_keys & set(corpus.planted_keys)
    # Held-out images are real digits, byte-identical to the same digit without a split.
    full = {s.key: s.image for s in digit_samples(n_duplicated=3, copies=4)[0]}
    assert all(r.image == full[r.key] for r in held)
    again = build_demo_corpus(tmp_path / "again", CorpusFormat.MANIFEST, n_duplicated=3,
                              copies=4, n_heldout=50)  # fmt: skip
    assert {r.key for r in open_source(again.heldout_path)} == held_keys  # seeded


def test_heldout_size_is_checked(tmp_path):
    with pytest.raises(ValueError, match="n_heldout"):
        build_demo_corpus(tmp_path, CorpusFormat.MANIFEST, n_duplicated=3, copies=4,
                          n_heldout=5000)  # fmt: skip
