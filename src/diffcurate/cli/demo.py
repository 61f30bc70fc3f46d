"""``diffcurate demo-corpus``: the bundled demo corpora with planted memorization secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffcurate.cli.common import fail, out, safe


def demo_corpus(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the corpus into.")],
    kind: Annotated[
        str,
        typer.Option(
            help="digits (scikit-learn 8x8 digits, for pixel DDPMs) | photos (32x32 crops of "
            "scikit-image's photos with captions, for text-to-image pipelines such as sd-tiny)."
        ),
    ] = "digits",
    format: Annotated[
        str, typer.Option("--format", "-f", help="folder | manifest | webdataset.")
    ] = "webdataset",
    n_duplicated: Annotated[
        int | None,
        typer.Option(help="Images planted as exact duplicates [default: digits 10, photos 3]."),
    ] = None,
    copies: Annotated[
        int | None,
        typer.Option(help="Total copies of each planted image [default: digits 30, photos 20]."),
    ] = None,
    near: Annotated[
        int, typer.Option(help="photos: images planted as near duplicates (shifted, noisy).")
    ] = 2,
    seed: Annotated[int, typer.Option(help="Seed choosing the planted images.")] = 0,
    heldout: Annotated[
        int | None,
        typer.Option(
            help="Images left out of training, written to OUT_DIR/heldout (ingest them as a "
            "held-out dataset for FD/KID and Mem% calibration) [default: digits 300, photos 50]."
        ),
    ] = None,
) -> None:
    """Write a bundled demo corpus with planted memorization secrets (see planted.json)."""
    from diffcurate.demo.corpus import CorpusFormat, build_demo_corpus

    try:
        fmt = CorpusFormat(format)
    except ValueError:
        raise fail(
            f"unknown --format {format!r}; use one of {[f.value for f in CorpusFormat]}"
        ) from None
    if kind not in ("digits", "photos"):
        raise fail(f"unknown --kind {kind!r}; use digits or photos")
    photos = kind == "photos"
    n_dup = n_duplicated if n_duplicated is not None else (3 if photos else 10)
    n_copies = copies if copies is not None else (20 if photos else 30)
    n_held = heldout if heldout is not None else (50 if photos else 300)
    try:
        if photos:
            from diffcurate.demo.photos import write_photo_corpus

            corpus = write_photo_corpus(out_dir, fmt=fmt, heldout=n_held, secrets=n_dup,
                                        near_secrets=near, copies=n_copies, seed=seed)  # fmt: skip
        else:
            corpus = build_demo_corpus(out_dir, fmt, n_duplicated=n_dup, copies=n_copies,
                                       seed=seed, n_heldout=n_held)  # fmt: skip
    except ValueError as e:
        raise fail(str(e)) from e
    out.print(safe(
        f"wrote {corpus.n_samples} samples ({corpus.format.value}) to {corpus.path}; "
        f"{len(corpus.planted_keys)} images planted x{n_copies} (see {out_dir / 'planted.json'})"
    ))  # fmt: skip
    if photos:
        out.print(
            f"{corpus.n_distinct} distinct images; {corpus.n_non_square} non-square and "
            f"{corpus.n_small} smaller than 32 px (for the geometry policy); exact secrets: "
            f"{', '.join(corpus.exact_keys)}; near secrets: {', '.join(corpus.near_keys)}"
        )
    if corpus.heldout_path is not None:
        out.print(safe(f"held out {corpus.n_heldout} images (never trained on) in "
                       f"{corpus.heldout_path}"))  # fmt: skip
