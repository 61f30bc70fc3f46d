import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffcurate.demo.writers import write_manifest
from diffcurate.ingest.sources import SourceError, open_source
from diffcurate.storage.reasons import Reason


def test_parquet_with_bytes_keys_and_metadata(tmp_path, digit_files):
    path = write_manifest(digit_files[:4], tmp_path / "m.parquet")
    src = open_source(path)
    assert (src.image_column, src.caption_column, src.key_column) == ("image", "caption", "key")
    recs = list(src)
    assert len(src) == 4
    for r, f in zip(recs, digit_files[:4], strict=True):
        assert (r.key, r.image, r.caption, r.metadata) == (f.key, f.image, f.caption, f.metadata)
        assert r.reason is None


def test_csv_with_relative_paths_and_non_utf8_caption(tmp_path, digit_files):
    (tmp_path / "img").mkdir()
    for f in digit_files[:2]:
        (tmp_path / "img" / f"{f.key}.png").write_bytes(f.image)
    lines = [
        b"path,caption,license",
        f"img/{digit_files[0].key}.png,a digit,cc0".encode(),
        f"img/{digit_files[1].key}.png,".encode() + "caf\xe9".encode("latin-1") + b",cc0",
        b"img/missing.png,gone,cc0",
    ]
    (tmp_path / "m.csv").write_bytes(b"\n".join(lines) + b"\n")
    recs = list(open_source(tmp_path / "m.csv"))
    assert recs[0].key == f"img/{digit_files[0].key}"
    assert recs[0].image == digit_files[0].image and recs[0].caption == "a digit"
    assert recs[0].metadata == {"license": "cc0"}
    assert recs[1].reason == Reason.CAPTION_NOT_UTF8
    assert recs[2].reason == Reason.IMAGE_MISSING


def test_huggingface_image_struct_and_null_key(tmp_path, digit_files):
    table = pa.table(
        {
            "id": ["a", None],
            "image": [{"bytes": digit_files[0].image, "path": None}] * 2,
            "text": ["x", "y"],
        }
    )
    pq.write_table(table, tmp_path / "hf.parquet")
    recs = list(open_source(tmp_path / "hf.parquet"))
    assert recs[0].key == "a" and recs[0].image == digit_files[0].image and recs[0].caption == "x"
    assert recs[1].reason == Reason.KEY_MISSING


def test_malformed_parquet_is_refused(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(SourceError, match="malformed parquet"):
        open_source(bad)


def test_truncated_parquet_is_refused(tmp_path, digit_files):
    path = write_manifest(digit_files[:4], tmp_path / "m.parquet")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="malformed parquet"):
        open_source(path)


def test_missing_image_column_is_refused_with_hint(tmp_path):
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "m.parquet")
    with pytest.raises(SourceError, match="--image-column"):
        open_source(tmp_path / "m.parquet")
