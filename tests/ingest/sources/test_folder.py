import json
import os

import pytest

from diffcurate.demo.writers import write_folder
from diffcurate.ingest.sources import SourceError, SourceFormat, detect_format, open_source
from diffcurate.storage.reasons import Reason


def test_reads_images_with_txt_and_json_sidecars(tmp_path, digit_files):
    write_folder(digit_files[:5], tmp_path)
    src = open_source(tmp_path)
    assert detect_format(tmp_path) == SourceFormat.FOLDER
    recs = list(src)
    assert len(src) == 5
    assert [r.key for r in recs] == sorted(f.key for f in digit_files[:5])
    by_key = {f.key: f for f in digit_files[:5]}
    for r in recs:
        assert r.reason is None
        assert r.image == by_key[r.key].image
        assert r.caption == by_key[r.key].caption
        assert r.metadata == by_key[r.key].metadata


def test_json_caption_used_without_txt_and_nested_keys(tmp_path, digit_files):
    f = digit_files[0]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.png").write_bytes(f.image)
    (tmp_path / "sub" / "x.json").write_text(json.dumps({"caption": "from json", "license": "cc0"}))
    [r] = list(open_source(tmp_path))
    assert (r.key, r.caption, r.metadata) == ("sub/x", "from json", {"license": "cc0"})


def test_bad_sidecars_become_reasons(tmp_path, digit_files):
    img = digit_files[0].image
    (tmp_path / "nocap.png").write_bytes(img)
    (tmp_path / "latin1.png").write_bytes(img)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "badjson.png").write_bytes(img)
    (tmp_path / "badjson.json").write_text("{not json")
    (tmp_path / "orphan.txt").write_text("caption without an image")
    (tmp_path / "twin.png").write_bytes(img)
    (tmp_path / "twin.jpg").write_bytes(img)
    (tmp_path / "twin.txt").write_text("two images, one stem")
    recs = {(r.key, r.source.rsplit(".", 1)[-1]): r for r in open_source(tmp_path)}
    assert recs[("nocap", "png")].caption is None and recs[("nocap", "png")].reason is None
    assert recs[("latin1", "png")].reason == Reason.CAPTION_NOT_UTF8
    assert recs[("latin1", "png")].caption_raw == "café".encode("latin-1")
    assert recs[("badjson", "png")].reason == Reason.METADATA_INVALID
    assert recs[("orphan", "txt")].reason == Reason.IMAGE_MISSING
    # Both twins are yielded under one key; the pipeline quarantines the second.
    assert {k for k in recs if k[0] == "twin"} == {("twin", "jpg"), ("twin", "png")}


def test_missing_source_is_refused(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        open_source(tmp_path / "nope")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_image_is_a_reason(tmp_path, digit_files):
    p = tmp_path / "locked.png"
    p.write_bytes(digit_files[0].image)
    p.chmod(0)
    [r] = list(open_source(tmp_path))
    assert r.reason == Reason.IMAGE_UNREADABLE
