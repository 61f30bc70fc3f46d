import pyarrow as pa
import pytest

from diffcurate.storage.lance_store import LanceStore, validate_dataset_name
from diffcurate.storage.schemas import DUPLICATES


def _dups(ids: list[str], dataset: str) -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            "sample_id": ids,
            "dataset": [dataset] * n,
            "exact_group": ids,
            "exact_group_size": [1] * n,
            "near_group": ids,
            "near_group_size": [1] * n,
            "near_method": ["phash"] * n,
            "run_id": ["r"] * n,
        },
        schema=DUPLICATES,
    )


def test_insert_new_is_idempotent_on_primary_key(tmp_path):
    store = LanceStore(str(tmp_path / "db"))
    assert store.insert_new("duplicates", _dups(["a", "b"], "d")) == 2
    assert store.insert_new("duplicates", _dups(["b", "c"], "d")) == 1
    assert store.insert_new("duplicates", _dups(["a", "b", "c"], "d")) == 0
    assert sorted(store.read("duplicates").column("sample_id").to_pylist()) == ["a", "b", "c"]


def test_replace_dataset_rows_touches_only_that_dataset(tmp_path):
    store = LanceStore(str(tmp_path / "db"))
    store.insert_new("duplicates", _dups(["a", "b"], "one"))
    store.insert_new("duplicates", _dups(["x"], "two"))
    store.replace_dataset_rows("duplicates", "one", _dups(["c"], "one"))
    assert store.read("duplicates", dataset="one").column("sample_id").to_pylist() == ["c"]
    assert store.read("duplicates", dataset="two").column("sample_id").to_pylist() == ["x"]
    assert store.count("duplicates") == 2


def test_reading_a_missing_table_is_empty(tmp_path):
    store = LanceStore(str(tmp_path / "db"))
    assert store.read("samples", columns=["sample_id"]).num_rows == 0
    assert store.count("samples", "d") == 0


@pytest.mark.parametrize("name", ["", "a b", "x'; drop", "../up", "-lead", "a" * 65])
def test_dataset_names_that_could_inject_are_refused(name):
    with pytest.raises(ValueError, match="invalid dataset name"):
        validate_dataset_name(name)


def test_where_filters_escape_values(tmp_path):
    store = LanceStore(str(tmp_path / "db"))
    store.insert_new("duplicates", _dups(["a", "b", "it's"], "d"))
    read = store.read
    assert read("duplicates", where={"sample_id": ["a", "it's"]}).num_rows == 2
    assert read("duplicates", where={"sample_id": "x' OR '1'='1"}).num_rows == 0
    assert read("duplicates", where={"sample_id": []}, columns=["sample_id"]).num_rows == 0
    with pytest.raises(ValueError, match="no column"):
        read("duplicates", where={"1=1 OR sample_id": "a"})
