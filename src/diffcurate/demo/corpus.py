"""Build the demo corpus from scikit-learn's digits (1,797 real 8×8 scans of handwriting).

Captions come from the labels; metadata carries attributes measured on each image (stroke
weight, slant) that serve as audit groups, plus a planted memorization set: a few images
duplicated many times, the classic way a diffusion model is made to memorize. The planted ids
go to ``planted.json`` beside the corpus, never into the metadata, so scorers cannot peek.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from diffcurate.demo.writers import SampleFile, write_folder, write_manifest, write_webdataset

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten digit {word}",
    "the number {word}, handwritten",
    "a scanned handwritten {word}",
)


class CorpusFormat(StrEnum):
    FOLDER = "folder"
    MANIFEST = "manifest"
    WEBDATASET = "webdataset"


@dataclass(frozen=True)
class DemoCorpus:
    path: Path
    format: CorpusFormat
    n_samples: int
    planted_keys: list[str]
    heldout_path: Path | None = None
    n_heldout: int = 0


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _slant(img: np.ndarray) -> str:
    """Sign of the intensity-weighted x/y covariance: which way the strokes lean."""
    ys, xs = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    w = img.astype(float) + 1e-9
    mx, my = (w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()
    cov = (w * (xs - mx) * (ys - my)).sum() / w.sum()
    return "left" if cov > 0.15 else "right" if cov < -0.15 else "upright"


def digit_samples(
    n_duplicated: int = 10, copies: int = 30, seed: int = 0
) -> tuple[list[SampleFile], list[str]]:
    """All digits as 8-bit grayscale PNGs, plus ``copies - 1`` extra copies of
    ``n_duplicated`` randomly chosen ones. Returns (samples, planted original keys)."""
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    ink = images.reshape(len(images), -1).mean(axis=1)
    thin, thick = np.quantile(ink, [1 / 3, 2 / 3])
    samples: list[SampleFile] = []
    for i, (img, label) in enumerate(zip(images, digits.target, strict=True)):
        stroke = "thin" if ink[i] < thin else "thick" if ink[i] > thick else "medium"
        samples.append(
            SampleFile(
                key=f"{i // 1000:05d}{i % 1000:04d}",
                image=png_bytes(img),
                ext="png",
                caption=TEMPLATES[i % len(TEMPLATES)].format(word=DIGIT_WORDS[int(label)]),
                metadata={
                    "label": int(label),
                    "stroke": stroke,
                    "slant": _slant(img),
                    "collection": "sklearn-digits",
                    "license": "CC-BY-4.0",
                },
            )
        )
    rng = np.random.default_rng(seed)
    planted = sorted(rng.choice(len(samples), size=n_duplicated, replace=False).tolist())
    extra = [
        SampleFile(
            key=f"dup-{samples[p].key}-{c:02d}",
            image=samples[p].image,
            ext=samples[p].ext,
            caption=samples[p].caption,
            metadata=samples[p].metadata,
        )
        for p in planted
        for c in range(1, copies)
    ]
    return samples + extra, [samples[p].key for p in planted]


def build_demo_corpus(
    out: Path,
    fmt: CorpusFormat = CorpusFormat.WEBDATASET,
    *,
    n_duplicated: int = 10,
    copies: int = 30,
    seed: int = 0,
    n_heldout: int = 0,
) -> DemoCorpus:
    """Write the demo corpus to ``out`` in the chosen source format.

    ``n_heldout`` digits (seeded, never a planted one) are left out of the training corpus and
    written to ``out/heldout`` in the same format: real images the model never sees, for FD/KID
    and for calibrating the memorization threshold.
    """
    samples, planted = digit_samples(n_duplicated, copies, seed)
    heldout: list[SampleFile] = []
    if n_heldout:
        candidates = [s.key for s in samples if not s.key.startswith("dup-")
                      and s.key not in set(planted)]  # fmt: skip
        if not 0 < n_heldout < len(candidates):
            raise ValueError(f"n_heldout must be in [0, {len(candidates) - 1}], got {n_heldout}")
        rng = np.random.default_rng([seed, 1])
        chosen = {candidates[i] for i in rng.choice(len(candidates), n_heldout, replace=False)}
        heldout = [s for s in samples if s.key in chosen]
        samples = [s for s in samples if s.key not in chosen]
    out.mkdir(parents=True, exist_ok=True)
    path = write_samples(samples, out, fmt)
    heldout_path = write_samples(heldout, out / "heldout", fmt) if heldout else None
    (out / "planted.json").write_text(
        json.dumps({"copies": copies, "seed": seed, "planted_keys": planted}, indent=2)
    )
    return DemoCorpus(path=path, format=fmt, n_samples=len(samples), planted_keys=planted,
                      heldout_path=heldout_path, n_heldout=len(heldout))  # fmt: skip


def write_samples(samples: list[SampleFile], out: Path, fmt: CorpusFormat) -> Path:
    """Write ``samples`` under ``out`` in ``fmt`` (the layout every demo corpus shares);
    returns what `diffcurate ingest` takes."""
    out.mkdir(parents=True, exist_ok=True)
    if fmt == CorpusFormat.FOLDER:
        write_folder(samples, out / "images")
        return out / "images"
    if fmt == CorpusFormat.MANIFEST:
        return write_manifest(samples, out / "manifest.parquet")
    write_webdataset(samples, out / "shards")
    return out / "shards"
