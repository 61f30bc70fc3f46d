import pandas as pd

from diffcurate.config import IngestSettings
from diffcurate.storage.reasons import Reason
from diffcurate.storage.validation import SampleBatchValidator


def test_each_expectation_maps_failing_rows_to_its_reason():
    v = SampleBatchValidator(IngestSettings(min_side=8, max_side=100, max_caption_chars=10))
    frame = pd.DataFrame(
        {
            "sample_id": ["a", "b", "c", "d", "e", "e", "g"],
            "caption": ["ok", None, "  \t", "x" * 11, "ok", "ok", "ok"],
            "width": [8, 8, 8, 8, 8, 8, 7],
            "height": [8, 8, 8, 8, 8, 8, 101],
            "sha256": ["h"] * 7,
        }
    )
    got = {(f.row, f.reason) for f in v.validate(frame)}
    assert got == {
        (1, Reason.CAPTION_MISSING),
        (2, Reason.CAPTION_EMPTY),
        (3, Reason.CAPTION_TOO_LONG),
        (4, Reason.DUPLICATE_ID),
        (5, Reason.DUPLICATE_ID),
        (6, Reason.SIZE_OUT_OF_BOUNDS),  # width too small and height too large
    }


def test_clean_frame_passes_and_validator_is_reusable():
    v = SampleBatchValidator(IngestSettings())
    frame = pd.DataFrame(
        {"sample_id": ["a", "b"], "caption": ["x", "y"], "width": [8, 64], "height": [8, 64],
         "sha256": ["h1", "h2"]}
    )  # fmt: skip
    assert v.validate(frame) == []
    assert v.validate(frame.iloc[:1]) == []
    assert v.validate(frame.iloc[:0]) == []


def test_vectorised_suite_equals_great_expectations_row_for_row():
    """validate() evaluates the suite without GX; it must give GX's failures, in GX's order
    (the first failure of a row names its quarantine reason)."""
    v = SampleBatchValidator(IngestSettings(min_side=8, max_side=100, max_caption_chars=10))
    frame = pd.DataFrame(
        {
            "sample_id": ["a", None, "c", "d", "e", "e", "g", "h", "i", "j", "a"],
            "caption": ["ok", None, "  \t", "x" * 11, "", "ok", " " * 12, "x" * 10, "é", "ok",
                        None],
            "width": [8, 8, 8, 8, 8, 8, 7, 100, 101, 50, 1],
            "height": [8, 8, 8, 8, 8, 8, 101, 100, 8, 7, 1],
            "sha256": ["h", "h", None, "h", "h", "h", "h", "h", "h", "h", None],
        }
    )  # fmt: skip
    fast = v.validate(frame)
    assert fast == v.validate_with_gx(frame)
    assert len({f.row for f in fast}) == 10  # every row but 'h' (at both bounds) fails
    assert v.validate(frame.iloc[7:8]) == v.validate_with_gx(frame.iloc[7:8]) == []
