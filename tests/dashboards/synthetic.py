"""A hygiene-run-shaped workspace written straight through the storage layer (no training):
real scikit-learn digits as samples, trace-like scores with per-layer parts, an audit, gate
checks and a candidate release. Used where a test needs many flagged images quickly."""

from __future__ import annotations

import hashlib
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import imagehash
import numpy as np
import pyarrow as pa
from PIL import Image
from sklearn.datasets import load_digits

from diffcurate.ingest.records import sample_id_for
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger
from diffcurate.storage.releases import create_candidate
from diffcurate.storage.schemas import SAMPLES, SCORES

LAYERS = ["down.0.conv", "down.1.conv", "mid.attn", "mid.conv", "up.0.conv", "up.1.conv"]


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def build_synthetic(ws: Path, dataset: str, n_samples: int, n_flagged: int) -> dict:
    """Write samples, scores and a hygiene run whose candidate removes ``n_flagged`` samples."""
    digits = load_digits()
    rng = np.random.default_rng(0)
    store, ledger = LanceStore(str(ws / "lancedb")), Ledger(ws / "ledger.duckdb")
    now = datetime.now(UTC)
    rows, ids = [], []
    for i in range(n_samples):
        img = (digits.images[i % len(digits.images)] * 15).astype(np.uint8)
        if i >= len(digits.images):  # vary repeats a little so every image is distinct
            img = np.clip(img.astype(int) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
        data = _png(img)
        key = f"digit-{i:05d}"
        sid = sample_id_for(dataset, key)
        ids.append(sid)
        label = int(digits.target[i % len(digits.target)])
        rows.append({
            "sample_id": sid, "dataset": dataset, "key": key, "source": "synthetic",
            "image": data, "image_format": "png", "width": 8, "height": 8,
            "sha256": hashlib.sha256(data).hexdigest(),
            "phash": str(imagehash.phash(Image.open(io.BytesIO(data)))),
            "caption": f"a handwritten digit {label}",
            "metadata": json.dumps({"stroke": "thick" if i % 3 else "thin"}),
            "embedding_model": None, "image_embedding": None, "text_embedding": None,
            "ingest_run_id": "ingest-synthetic", "ingested_at": now,
        })  # fmt: skip
    store.insert_new("samples", pa.Table.from_pylist(rows, schema=SAMPLES))
    score_run = ledger.start_run("score", dataset=dataset, params={"signal": "trace"})
    parts = rng.gamma(2.0, 1.0, size=(n_samples, len(LAYERS)))
    parts[:, 2] *= 3  # the attention layer dominates
    scores = parts.sum(axis=1)
    store.insert_new("scores", pa.Table.from_pylist([
        {"score_id": f"{score_run}/{sid}", "run_id": score_run, "dataset": dataset,
         "sample_id": sid, "signal": "trace", "score": float(s), "stderr": None,
         "per_layer": p.tolist(), "per_timestep": None, "method": "hutchinson",
         "scored_at": now}
        for sid, s, p in zip(ids, scores, parts, strict=True)
    ], schema=SCORES))  # fmt: skip
    ledger.finish_run(score_run, status="completed", stats={"layer_names": LAYERS})
    order = np.argsort(-scores)
    removed = [ids[i] for i in order[:n_flagged]]
    kept = [ids[i] for i in order[n_flagged:]]
    run_id = ledger.start_run("hygiene", dataset=dataset, source="synthetic", params={
        "scorer": {"signal": "trace"}, "audit": {"min_retention_ratio": 0.8},
        "measure": {"memorization": {"metric": "l2", "threshold": 0.1}}})  # fmt: skip
    removed_set = set(removed)
    groups = {}
    for i, sid in enumerate(ids):
        g = groups.setdefault("thick" if i % 3 else "thin", {"n": 0, "n_removed": 0})
        g["n"] += 1
        g["n_removed"] += sid in removed_set
    group_rows = {
        k: {"group": k, **v, "removal_rate": v["n_removed"] / v["n"],
            "retention_rate": 1 - v["n_removed"] / v["n"], "included": True}
        for k, v in groups.items()
    }  # fmt: skip
    ledger.record_audit(run_id, dataset=dataset, attribute="stroke", groups=group_rows,
                        passed=True, summary={"retention_ratio": 0.97, "test": "chi2",
                                              "p_value": 0.4, "p_value_holm": 0.4,
                                              "cramers_v": 0.02, "ratio_violation": False,
                                              "dependence_violation": False})  # fmt: skip
    gates = [
        {"name": "mem_pct", "value_before": 12.0, "value_after": 4.0, "threshold": 10.0,
         "passed": True, "reason": "Mem% after 4.0 <= 10.0"},
        {"name": "fd", "value_before": 3.1, "value_after": 3.6, "threshold": 3.41,
         "passed": False, "reason": "FD rose 16% > 10%"},
    ]  # fmt: skip
    for g in gates:
        ledger.record_gate_check(run_id, name=g["name"], passed=g["passed"],
                                 policy_version="gate-v1", value_before=g["value_before"],
                                 value_after=g["value_after"], threshold=g["threshold"],
                                 inputs={"reason": g["reason"]})  # fmt: skip
    info = create_candidate(store, ledger, dataset, kept, removed, manifest={
        "runs": {"hygiene": run_id, "score": score_run},
        "audit": {"passed": True, "violations": []}, "gates": gates, "gate_passed": False,
    }, created_by="synthetic")  # fmt: skip
    stats = {"run_id": run_id, "dataset": dataset, "score_run": score_run,
             "n_samples": n_samples, "n_flagged_images": n_flagged, "n_removed": n_flagged,
             "n_kept": n_samples - n_flagged, "audit_passed": True, "gate_passed": False,
             "gates": gates, "secrets": removed[:3], "secrets_source": "flagged images",
             "per_secret": {s: {"before": 0.05, "after": 0.3} for s in removed[:3]},
             "release_tag": info.tag, "reference": "kept training images",
             "mitigation": "finetune: 10 steps"}  # fmt: skip
    ledger.finish_run(run_id, status="completed", stats=stats)
    return {"run_id": run_id, "tag": info.tag, "removed": removed, "kept": kept}
