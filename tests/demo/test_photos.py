"""The photo demo corpus: seeded crops of scikit-image photos with planted exact/near secrets."""

import hashlib
import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from diffcurate.demo.corpus import CorpusFormat
from diffcurate.demo.photos import PHOTO_SOURCES, photo_samples, write_photo_corpus
from diffcurate.ingest.sources import open_source

N_TRAIN, HELDOUT, COPIES = 300, 50, 20


@pytest.fixture(scope="module")
def made():
    return photo_samples(heldout=HELDOUT)


def _pixels(sample) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample.image))).astype(np.float64) / 127.5 - 1


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).mean()))


def _hashes(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_counts_keys_and_geometry(made):
    assert len(made.train) == N_TRAIN + 3 * (COPIES - 1) + 2 * (COPIES - 1) == 395
    assert len(made.heldout) == HELDOUT
    # Golden secret choice of seed 0 (numpy's PCG64 streams are stable across versions).
    assert made.exact_keys == ["000000023", "000000084", "000000289"]
    assert made.near_keys == ["000000069", "000000120"]
    sizes = Counter(Image.open(io.BytesIO(s.image)).size for s in made.train[:N_TRAIN])
    # Every 10th crop (i % 10 == 7) is 3:2, every 25th (i % 25 == 11) is half size.
    assert sizes[(48, 32)] + sizes[(32, 48)] == 30 and min(sizes[(48, 32)], sizes[(32, 48)]) > 0
    assert sizes[(16, 16)] == 12 and sizes[(32, 32)] == N_TRAIN - 42
    for s in made.train[:N_TRAIN]:
        w, h = Image.open(io.BytesIO(s.image)).size
        want = "square" if w == h else "landscape" if w > h else "portrait"
        assert s.metadata["orientation"] == want
        assert Image.open(io.BytesIO(s.image)).mode == "RGB"
    # Sources rotate, so audit groups are balanced: 300 = 14 × 21 + 6.
    per_source = Counter(s.metadata["source"] for s in made.train[:N_TRAIN])
    assert per_source == {p.name: 22 if i < 6 else 21 for i, p in enumerate(PHOTO_SOURCES)}
    assert {s.metadata["license"] for s in made.train} == {
        "CC0-1.0",
        "public-domain",
        "no-known-restrictions",
    }
    assert set(Counter(s.metadata["brightness"] for s in made.train)) == {
        "dark",
        "medium",
        "bright",
    }


def test_exact_secrets_are_byte_identical_copies_and_nothing_else_is(made):
    by_image = Counter(s.image for s in made.train)
    for key in made.exact_keys:
        family = [s for s in made.train if s.key == key or s.key.startswith(f"dup-{key}-")]
        assert len(family) == COPIES and len({s.image for s in family}) == 1
        assert by_image[family[0].image] == COPIES
        assert {s.caption for s in family} == {family[0].caption}
    # The distinct crops are all different images.
    assert len({s.image for s in made.train[:N_TRAIN]}) == N_TRAIN


def test_near_copies_are_distinct_but_closer_than_any_other_crop(made):
    distinct = {s.key: _pixels(s) for s in made.train[:N_TRAIN]}
    copies = {s.key: s for s in made.train[N_TRAIN:]}
    for key in made.near_keys:
        family = made.near_copies[key]
        assert family == [f"near-{key}-{c:02d}" for c in range(1, COPIES)]
        images = [copies[k].image for k in family] + [made.train[int(key)].image]
        assert len(set(images)) == COPIES  # no two byte-identical
        original = distinct[key]
        nearest_other = min(
            _rmse(original, x)
            for k, x in distinct.items()
            if k != key and x.shape == original.shape
        )
        gaps = [_rmse(original, _pixels(copies[k])) for k in family]
        # Measured for seed 0: copies 0.026-0.232 from their original, other crops >= 0.161.
        assert min(gaps) > 0.01 and max(gaps) < 0.25
        assert max(gaps) < nearest_other
        assert {copies[k].caption for k in family} == {made.train[int(key)].caption}


def test_captions_identify_every_distinct_image_and_fit_the_metadata(made):
    distinct = made.train[:N_TRAIN] + made.heldout
    captions = Counter(s.caption for s in distinct)
    assert len(captions) == len(distinct)  # unique, secrets included
    for key in made.exact_keys + made.near_keys:
        assert captions[made.train[int(key)].caption] == 1
    first = made.train[0]
    assert first.caption == "a photo of an astronaut, crop 0 near the center, in soft light"
    assert first.metadata == {
        "source": "astronaut",
        "brightness": "medium",
        "orientation": "square",
        "color": "color",
        "view": "medium",
        "collection": "skimage-data",
        "license": "public-domain",
    }
    gray = made.train[7]  # camera, a 3:2 crop
    assert gray.caption.startswith("a close-up black and white photo of a cameraman, crop 0")
    assert gray.caption.endswith(", landscape format") and gray.metadata["color"] == "grayscale"


def test_heldout_is_disjoint_and_is_the_continuation_of_the_crop_sequence(made):
    train_keys, held_keys = {s.key for s in made.train}, {s.key for s in made.heldout}
    assert not train_keys & held_keys
    assert not {s.image for s in made.train} & {s.image for s in made.heldout}
    assert [s.key for s in made.heldout] == [f"00000{i:04d}" for i in range(300, 350)]
    # Crops depend on (seed, index) only: a smaller corpus is a prefix of a larger one.
    small = photo_samples(heldout=4, n_train=20, secrets=1, near_secrets=0, copies=2)
    assert [s.image for s in small.heldout] == [s.image for s in made.train[20:24]]


def test_writing_is_deterministic_and_reads_back_through_ingest(tmp_path):
    kwargs = dict(heldout=5, n_train=40, secrets=2, near_secrets=1, copies=3)
    a = write_photo_corpus(tmp_path / "a", **kwargs)
    write_photo_corpus(tmp_path / "b", **kwargs)
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    assert a.n_samples == 40 + 3 * 2 and a.n_heldout == 5 and a.n_distinct == 40
    assert (a.n_non_square, a.n_small) == (4, 2)  # i % 10 == 7 and i % 25 == 11 below 40
    planted = json.loads((tmp_path / "a" / "planted.json").read_text())
    assert planted["planted_keys"] == a.planted_keys == a.exact_keys + a.near_keys
    assert planted["copies"] == 3 and planted["seed"] == 0
    assert planted["near_copies"] == {
        a.near_keys[0]: [f"near-{a.near_keys[0]}-{c:02d}" for c in (1, 2)]
    }
    records = list(open_source(a.path))
    assert len(records) == a.n_samples and all(r.reason is None for r in records)
    assert len(list(open_source(a.heldout_path))) == 5
    other_seed = write_photo_corpus(tmp_path / "c", **kwargs, seed=1)
    assert other_seed.planted_keys != a.planted_keys


@pytest.mark.parametrize("fmt", [CorpusFormat.FOLDER, CorpusFormat.MANIFEST])
def test_other_formats_hold_the_same_samples(tmp_path, fmt):
    kwargs = dict(heldout=2, n_train=15, secrets=1, near_secrets=1, copies=2)
    web = {r.key: r.image for r in open_source(write_photo_corpus(tmp_path / "w", **kwargs).path)}
    corpus = write_photo_corpus(tmp_path / "x", fmt=fmt.value, **kwargs)
    assert {r.key: r.image for r in open_source(corpus.path)} == web
    write_photo_corpus(tmp_path / "y", fmt=fmt, **kwargs)
    assert _hashes(tmp_path / "x") == _hashes(tmp_path / "y")


def test_bad_arguments():
    with pytest.raises(ValueError, match="only 1 crops"):
        photo_samples(heldout=0, n_train=1, secrets=2, near_secrets=0)
    with pytest.raises(ValueError, match="heldout"):
        photo_samples(heldout=-1)
