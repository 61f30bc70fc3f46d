"""The inferred_attributes table: replace per (dataset, attribute), skip an unchanged write,
read back wide with provenance."""

from __future__ import annotations

import pytest

from diffcurate.storage.attributes import read_attributes, stored_fingerprint, write_attribute
from diffcurate.storage.lance_store import LanceStore


def _write(store, values, fingerprint="fp1", dataset="d", attribute="tone", ids=None):
    ids = ids or [f"s{i}" for i in range(len(values))]
    return write_attribute(store, dataset, attribute, sample_ids=ids, values=values,
                           confidence=[0.9] * len(values), source="zero-shot", model="clip@x",
                           fingerprint=fingerprint, run_id="r")  # fmt: skip


def test_write_replace_skip_and_read(tmp_path):
    store = LanceStore(str(tmp_path / "lancedb"))
    assert read_attributes(store, "d")[0].empty
    assert _write(store, ["dark", "light", "dark"]) == 3
    assert _write(store, ["dark", "light", "dark"]) == 0  # same fingerprint, same samples
    assert stored_fingerprint(store, "d", "tone") == ("fp1", 3)
    assert _write(store, ["light", "light", "light"], fingerprint="fp2") == 3  # replaced
    assert stored_fingerprint(store, "d", "tone") == ("fp2", 3)
    _write(store, ["0", "1", "2+"], attribute="faces")
    _write(store, ["x"], dataset="other")
    frame, prov = read_attributes(store, "d")
    assert sorted(frame.columns) == ["faces", "sample_id", "tone"]
    assert frame.set_index("sample_id")["tone"].to_dict() == {"s0": "light", "s1": "light",
                                                             "s2": "light"}  # fmt: skip
    assert prov["tone"].fingerprint == "fp2" and prov["tone"].n_samples == 3
    assert prov["tone"].describe() == "inferred (zero-shot) by clip@x [fp2]"
    assert store.count("inferred_attributes") == 7
    with pytest.raises(ValueError):
        _write(store, ["a"], ids=["s0", "s1"])
