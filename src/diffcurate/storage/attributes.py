"""The ``inferred_attributes`` table: group labels inferred per sample, with their provenance.

One row per (attribute, sample): the label, a confidence where the method has one, the source
(``zero-shot``, ``caption``, ``faces``), the model that produced it and the fingerprint of its
weights and settings. An attribute of a dataset is written as a whole and replaced as a whole,
so its rows always come from one model and one setting; writing it again under the same
fingerprint and for the same samples changes nothing (computed once per sample).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import pandas as pd
import pyarrow as pa

from diffcurate.storage.lance_store import LanceStore, validate_dataset_name

TABLE = "inferred_attributes"


def _quoted(value: str) -> str:
    """A SQL string literal for a Lance filter (quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class AttributeProvenance:
    """Where one inferred attribute of a dataset came from.

    Attributes:
        attribute: Attribute name.
        source: ``zero-shot``, ``caption`` or ``faces``.
        model: What produced the labels (e.g. ``ViT-B-32@clip.pt``, ``keywords``).
        fingerprint: Digest of the weights and settings.
        n_samples: Samples labelled.
        run_id: The run that computed them.
    """

    attribute: str
    source: str
    model: str
    fingerprint: str
    n_samples: int
    run_id: str

    def describe(self) -> str:
        """One phrase for reports: inferred, by what."""
        return f"inferred ({self.source}) by {self.model} [{self.fingerprint[:12]}]"


def stored_fingerprint(store: LanceStore, dataset: str, attribute: str) -> tuple[str | None, int]:
    """The fingerprint an attribute of a dataset was stored under and how many rows it has."""
    rows = store.read(TABLE, dataset, columns=["fingerprint"], where={"attribute": attribute})
    prints = set(rows.column("fingerprint").to_pylist())
    return (prints.pop() if len(prints) == 1 else None), rows.num_rows


def write_attribute(
    store: LanceStore,
    dataset: str,
    attribute: str,
    *,
    sample_ids: Sequence[str],
    values: Sequence[str],
    confidence: Sequence[float | None] | None,
    source: str,
    model: str,
    fingerprint: str,
    run_id: str,
) -> int:
    """Replace one attribute of a dataset by these labels; returns the rows written.

    Skips the write (returns 0) when the attribute is already stored for exactly these samples
    under the same fingerprint.
    """
    validate_dataset_name(dataset)
    if len(values) != len(sample_ids):
        raise ValueError(f"{len(values)} values for {len(sample_ids)} samples")
    old, n = stored_fingerprint(store, dataset, attribute)
    if old == fingerprint and n == len(sample_ids):
        have = store.read(TABLE, dataset, columns=["sample_id"], where={"attribute": attribute})
        if set(have.column("sample_id").to_pylist()) == set(sample_ids):
            return 0
    conf = list(confidence) if confidence is not None else [None] * len(values)
    now = datetime.now(UTC)
    rows = pa.table({
        "attribute_id": [f"{attribute}/{s}" for s in sample_ids],
        "dataset": [dataset] * len(values), "sample_id": list(sample_ids),
        "attribute": [attribute] * len(values), "value": [str(v) for v in values],
        "confidence": pa.array(conf, pa.float64()), "source": [source] * len(values),
        "model": [model] * len(values), "fingerprint": [fingerprint] * len(values),
        "run_id": [run_id] * len(values), "computed_at": [now] * len(values),
    })  # fmt: skip
    tbl = store.table(TABLE)
    tbl.delete(f"dataset = {_quoted(dataset)} AND attribute = {_quoted(attribute)}")
    schema = tbl.schema
    tbl.add(rows.select(schema.names).cast(schema))
    return rows.num_rows


def read_attributes(
    store: LanceStore, dataset: str
) -> tuple[pd.DataFrame, dict[str, AttributeProvenance]]:
    """A dataset's inferred attributes, one column per attribute, and their provenance.

    Returns:
        ``(frame, provenance)``: ``frame`` has ``sample_id`` and one column per attribute
        (samples without a label are missing, which the audit counts as ``unknown``).
    """
    cols = ["sample_id", "attribute", "value", "source", "model", "fingerprint", "run_id"]
    table = store.read(TABLE, dataset, columns=cols).to_pandas()
    if table.empty:
        return pd.DataFrame({"sample_id": pd.Series([], dtype=object)}), {}
    wide = table.pivot(index="sample_id", columns="attribute", values="value").reset_index()
    wide.columns.name = None
    provenance = {}
    for name, rows in table.groupby("attribute", sort=True):
        first = rows.iloc[0]
        provenance[str(name)] = AttributeProvenance(
            attribute=str(name), source=str(first["source"]), model=str(first["model"]),
            fingerprint=str(first["fingerprint"]), n_samples=len(rows),
            run_id=str(first["run_id"]),
        )  # fmt: skip
    return wide, provenance
