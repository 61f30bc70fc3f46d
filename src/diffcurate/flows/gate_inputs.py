"""What the hygiene and eval flows read before they measure models: one definition for both.

* the dataset's metadata frame and duplicate groups;
* the secret set, resolved from keys or ids and collapsed to DISTINCT images: a secret copied
  20 times is one image to reproduce, so it is generated for once, not 20 times;
* the gate's images in pixel space, prepared like the training images (same geometry policy,
  at the pixel size the model's VAE decodes to): the secrets, the utility reference (held-out
  where given) and the neighbour set of the relative reconstruction rule (distinct training
  images outside the secrets' exact and near groups, so no copy of a secret can be its own
  neighbour);
* the caption states of a text-conditional model: each secret's and reference image's own
  caption, and the empty caption for classifier-free guidance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from diffcurate.curation.groups import GroupBy
from diffcurate.models.diffusion import DiffusionModel
from diffcurate.models.images import Geometry, GeometryReport, load_training_images
from diffcurate.models.inputs import ModelInputs
from diffcurate.storage.lance_store import LanceStore

MAX_NEIGHBOURS = 2000
"""Distinct training images the relative rule searches for each generation's neighbours."""
MAX_REFERENCE = 1000
"""Training images standing in for held-out ones when no held-out dataset is given."""


def metadata_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per sample: sample_id, key, caption and every top-level metadata field."""
    records = []
    for r in rows:
        meta = json.loads(r["metadata"] or "{}")
        flat = {k: v for k, v in meta.items() if not isinstance(v, dict | list)}
        records.append({**flat, "sample_id": r["sample_id"], "key": r["key"],
                        "caption": r["caption"]})  # fmt: skip
    return pd.DataFrame.from_records(records)


def duplicate_group_of(store: LanceStore, dataset: str, group_by: GroupBy) -> dict[str, str]:
    """Sample id → its duplicate group (from ingest's ``duplicates`` table); absent = alone."""
    if group_by == "none" or not store.has_table("duplicates"):
        return {}
    column = "exact_group" if group_by == "exact" else "near_group"
    table = store.read("duplicates", dataset, columns=["sample_id", column])
    return dict(zip(table.column("sample_id").to_pylist(), table.column(column).to_pylist(),
                    strict=True))  # fmt: skip


def resolve_secrets(
    secrets: list[str], frame: pd.DataFrame, flagged_reps: list[str]
) -> tuple[list[str], str]:
    """Secret sample ids from keys or ids; default: the flagged images (one per group)."""
    if not secrets:
        return list(flagged_reps), "flagged images"
    by_key = dict(zip(frame["key"], frame["sample_id"], strict=True))
    known = set(frame["sample_id"])
    out, unknown = [], []
    for s in secrets:
        if s in known:
            out.append(s)
        elif s in by_key:
            out.append(by_key[s])
        else:
            unknown.append(s)
    if unknown:
        raise ValueError(f"secrets not found in the dataset (keys or sample ids): {unknown[:5]}")
    return list(dict.fromkeys(out)), "configured"


def distinct_secrets(secret_ids: list[str], exact_group_of: dict[str, str]) -> list[str]:
    """One secret per exact-duplicate group, the first listed (copies are one image)."""
    seen: set[str] = set()
    out = []
    for sid in secret_ids:
        group = exact_group_of.get(sid, sid)
        if group not in seen:
            seen.add(group)
            out.append(sid)
    return out


def caption_embeddings(
    model: DiffusionModel, frame: pd.DataFrame, ids: list[str]
) -> torch.Tensor | None:
    """Caption embeddings of ``ids`` for a text-conditional model (None for unconditional)."""
    if not model.conditional:
        return None
    if model.text_encoder is None:
        raise ValueError("a text-conditional model needs its text encoder (text_encoder/)")
    caption = dict(zip(frame["sample_id"], frame["caption"], strict=True))
    return model.text_encoder.encode([caption[i] or "" for i in ids])


@dataclass
class GateImages:
    """Everything a model is measured against, in pixel space ([-1, 1]).

    Attributes:
        secret_ids: Distinct secrets (one per exact-duplicate group).
        secrets: Their pixels ``[S, C, H, W]``.
        secret_cond: Their caption states (text-conditional models) or None.
        reference: Utility reference / calibration images.
        reference_cond: Their caption states or None.
        reference_described: Where the reference images come from.
        neighbours: Distinct training images for the relative rule (None: none needed).
        unconditional: The empty caption's states (text-conditional models) or None.
        n_secret_samples: Samples the configured secrets cover, copies included.
        geometry: How the secrets' and reference images' geometry was handled.
    """

    secret_ids: list[str]
    secrets: torch.Tensor
    secret_cond: torch.Tensor | None
    reference: torch.Tensor
    reference_cond: torch.Tensor | None
    reference_described: str
    neighbours: torch.Tensor | None
    unconditional: torch.Tensor | None
    n_secret_samples: int
    geometry: GeometryReport


def _pixels(
    store: LanceStore, dataset: str, inputs: ModelInputs, ids: list[str] | None
) -> tuple[torch.Tensor, list[str], GeometryReport]:
    images = load_training_images(
        store, dataset, channels=inputs.pixel_channels, size=inputs.pixel_size,
        sample_ids=ids, geometry=inputs.geometry,
    )  # fmt: skip
    return images.pixels, images.sample_ids, images.geometry


def gate_images(
    store: LanceStore,
    dataset: str,
    model: DiffusionModel,
    frame: pd.DataFrame,
    secret_ids: list[str],
    *,
    training_ids: list[str],
    heldout_dataset: str | None,
    seed: int,
    geometry: Geometry = "center-crop",
    with_neighbours: bool = False,
    what: str = "training images",
) -> GateImages:
    """Read the secrets, the reference and (for the relative rule) the neighbour images.

    Args:
        store: The workspace's LanceDB tables.
        dataset: The dataset the model was trained on.
        model: The model (gives the pixel size and the text encoder).
        frame: :func:`metadata_frame` of ``dataset``.
        secret_ids: Resolved secret sample ids (copies allowed: collapsed here).
        training_ids: Candidates for the reference when there is no held-out dataset.
        heldout_dataset: Ingested held-out images for FD/KID and calibration.
        seed: Seeds the pick of stand-in reference and neighbour images.
        geometry: The geometry policy the model's inputs use.
        with_neighbours: Read the neighbour set of the relative rule.
        what: How the stand-in reference images are described.
    """
    inputs = ModelInputs.of(model, geometry)
    exact = duplicate_group_of(store, dataset, "exact")
    distinct = distinct_secrets(secret_ids, exact)
    secret_groups = {exact.get(s, s) for s in distinct}
    n_copies = sum(exact.get(s, s) in secret_groups for s in frame["sample_id"])
    secrets, _, geo = _pixels(store, dataset, inputs, distinct)
    rng = np.random.default_rng(seed)
    if heldout_dataset is not None:
        reference, ref_ids, _ = _pixels(store, heldout_dataset, inputs, None)
        ref_frame = metadata_frame(store.read(
            "samples", heldout_dataset,
            columns=["sample_id", "key", "caption", "metadata"]).to_pylist())  # fmt: skip
        ref_cond = caption_embeddings(model, ref_frame, ref_ids)
        described = f"{len(ref_ids)} images of held-out dataset {heldout_dataset!r}"
    else:
        pick = sorted(rng.choice(len(training_ids), size=min(len(training_ids), MAX_REFERENCE),
                                 replace=False))  # fmt: skip
        ref_ids = [training_ids[i] for i in pick]
        reference, _, _ = _pixels(store, dataset, inputs, ref_ids)
        ref_cond = caption_embeddings(model, frame, ref_ids)
        described = f"{len(ref_ids)} {what} (no held-out dataset)"
    neighbours = None
    if with_neighbours:
        near = duplicate_group_of(store, dataset, "near")
        near_groups = {near.get(s, s) for s in distinct}
        seen: set[str] = set()
        candidates = []
        for sid in frame["sample_id"]:
            group = exact.get(sid, sid)
            if group in secret_groups or near.get(sid, sid) in near_groups or group in seen:
                continue
            seen.add(group)
            candidates.append(sid)
        if len(candidates) > MAX_NEIGHBOURS:
            pick = sorted(rng.choice(len(candidates), size=MAX_NEIGHBOURS, replace=False))
            candidates = [candidates[i] for i in pick]
        if candidates:
            neighbours, _, _ = _pixels(store, dataset, inputs, candidates)
    uncond = None
    if model.conditional and model.text_encoder is not None:
        uncond = model.text_encoder.encode([""])
    return GateImages(
        secret_ids=distinct, secrets=secrets,
        secret_cond=caption_embeddings(model, frame, distinct), reference=reference,
        reference_cond=ref_cond, reference_described=described, neighbours=neighbours,
        unconditional=uncond, n_secret_samples=n_copies, geometry=geo,
    )  # fmt: skip
