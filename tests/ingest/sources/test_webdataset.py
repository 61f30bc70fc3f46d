import io
import json
import tarfile

from diffcurate.demo.writers import write_webdataset
from diffcurate.ingest.sources import SourceFormat, detect_format, open_source
from diffcurate.storage.reasons import Reason


def _tar(path, members: list[tuple[str, bytes]], symlink: str | None = None) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tf.addfile(info)


def test_reads_img2dataset_layout_across_shards(tmp_path, digit_files):
    shards = write_webdataset(digit_files[:7], tmp_path, shard_size=3)
    assert [s.name for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert detect_format(tmp_path) == SourceFormat.WEBDATASET
    recs = list(open_source(tmp_path))
    assert [r.key for r in recs] == [f.key for f in digit_files[:7]]
    for r, f in zip(recs, digit_files[:7], strict=True):
        assert (r.image, r.caption, r.metadata, r.reason) == (f.image, f.caption, f.metadata, None)


def test_path_traversal_absolute_and_link_members_are_refused(tmp_path, digit_files):
    img = digit_files[0].image
    _tar(
        tmp_path / "evil.tar",
        [
            ("ok.png", img), ("ok.txt", b"fine"),
            ("../escape.png", img), ("../escape.txt", b"x"),
            ("/abs/path.png", img),
        ],
        symlink="link.png",
    )  # fmt: skip
    recs = list(open_source(tmp_path / "evil.tar"))
    ok = [r for r in recs if r.reason is None]
    assert [(r.key, r.caption) for r in ok] == [("ok", "fine")]
    refused = sorted(r.source.split("#", 1)[1] for r in recs if r.reason == Reason.UNSAFE_PATH)
    assert refused == ["../escape.png", "../escape.txt", "/abs/path.png", "link.png"]
    assert not (tmp_path.parent / "escape.png").exists()


def test_truncated_shard_keeps_what_was_read(tmp_path, digit_files):
    [shard] = write_webdataset(digit_files[:6], tmp_path, shard_size=10)
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * 0.6)])
    recs = list(open_source(shard))
    good = [r for r in recs if r.reason is None]
    assert 1 <= len(good) < 6
    assert [r.key for r in good] == [f.key for f in digit_files[: len(good)]]
    assert recs[-1].reason == Reason.SHARD_CORRUPT


def test_missing_image_bad_json_and_non_utf8_caption(tmp_path, digit_files):
    img = digit_files[0].image
    _tar(
        tmp_path / "s.tar",
        [
            ("a.txt", b"caption only"),
            ("b.png", img), ("b.json", b"[1, 2]"),
            ("c.png", img), ("c.txt", b"\xff\xfe bad"), ("c.json", json.dumps({"k": 1}).encode()),
        ],
    )  # fmt: skip
    recs = {r.key: r for r in open_source(tmp_path / "s.tar")}
    assert recs["a"].reason == Reason.IMAGE_MISSING
    assert recs["b"].reason == Reason.METADATA_INVALID
    assert recs["c"].reason == Reason.CAPTION_NOT_UTF8 and recs["c"].metadata == {"k": 1}


def test_unsafe_member_names_fast_path_agrees_with_the_path_check():
    from pathlib import PurePosixPath

    from diffcurate.ingest.sources.webdataset import _unsafe

    def by_path(name: str) -> bool:
        p = PurePosixPath(name.replace("\\", "/"))
        return p.is_absolute() or ".." in p.parts or (len(name) > 1 and name[1] == ":")

    names = ["", "a", "a.jpg", "dir/a.jpg", "../a", "a/../b", "/abs", "\\abs", "C:x", "c:\\x",
             "a..b.jpg", "..", "a\\..\\b", "x/..", ".hidden", "a:b"]  # fmt: skip
    assert [_unsafe(n) for n in names] == [by_path(n) for n in names]
    unsafe = ["../a", "a/../b", "/abs", "\\abs", "C:x", "c:\\x", "..", "a\\..\\b", "x/..", "a:b"]
    assert [n for n in names if _unsafe(n)] == unsafe
