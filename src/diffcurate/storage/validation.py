"""great-expectations suites for ingest batches, built in code on an ephemeral context.

GX gives us declarative, reportable expectations; we use its COMPLETE result format to map each
failing row back to a quarantine reason. Decoding problems (corrupt files, bombs) are caught
earlier by the decoder: GX validates the *table* of decoded rows.

The suite is the rule. Each GX validation call builds a metric graph whose fixed cost dwarfs a
shard's decoding, so the suite's expectations are evaluated by vectorised pandas twins of the
same types (GX's semantics: nulls pass every check but not-null, bounds are inclusive, every
copy of a repeated value fails uniqueness); a suite holding any other type runs through GX.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import great_expectations as gx
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig

from diffcurate.config import IngestSettings
from diffcurate.storage.reasons import Reason

ROW_INDEX = "_row"

# GX pins some module loggers to INFO at import ("Created temporary directory ..." on every
# ephemeral context); ingest runs create one per run, so quiet them.
for _name in ("great_expectations", "great_expectations.data_context.types.base"):
    logging.getLogger(_name).setLevel(logging.WARNING)


@dataclass(frozen=True)
class RowFailure:
    row: int
    reason: Reason
    detail: str


def _expectations(cfg: IngestSettings) -> list[tuple[gx.expectations.Expectation, Reason]]:
    e = gx.expectations
    return [
        (e.ExpectColumnValuesToNotBeNull(column="sample_id"), Reason.KEY_MISSING),
        (e.ExpectColumnValuesToNotBeNull(column="caption"), Reason.CAPTION_MISSING),
        (e.ExpectColumnValuesToMatchRegex(column="caption", regex=r"\S"), Reason.CAPTION_EMPTY),
        (
            e.ExpectColumnValueLengthsToBeBetween(
                column="caption", min_value=0, max_value=cfg.max_caption_chars
            ),
            Reason.CAPTION_TOO_LONG,
        ),
        (
            e.ExpectColumnValuesToBeBetween(
                column="width", min_value=cfg.min_side, max_value=cfg.max_side
            ),
            Reason.SIZE_OUT_OF_BOUNDS,
        ),
        (
            e.ExpectColumnValuesToBeBetween(
                column="height", min_value=cfg.min_side, max_value=cfg.max_side
            ),
            Reason.SIZE_OUT_OF_BOUNDS,
        ),
        (e.ExpectColumnValuesToNotBeNull(column="sha256"), Reason.CORRUPT_IMAGE),
        (e.ExpectColumnValuesToBeUnique(column="sample_id"), Reason.DUPLICATE_ID),
    ]


class SampleBatchValidator:
    """Validates DataFrames of decoded rows (columns: sample_id, caption, width, height, sha256).

    Build once per run (context creation is the slow part), then call per shard.
    """

    SUITE_NAME = "diffcurate_samples"

    def __init__(self, cfg: IngestSettings) -> None:
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(
            globally=False, metric_calculations=False
        )
        asset = self.context.data_sources.add_pandas("ingest").add_dataframe_asset("shard")
        self.batch_definition = asset.add_batch_definition_whole_dataframe("whole")
        self.suite = self.context.suites.add(gx.ExpectationSuite(name=self.SUITE_NAME))
        self._reasons: dict[str, Reason] = {}
        for expectation, reason in _expectations(cfg):
            added = self.suite.add_expectation(expectation)
            self._reasons[str(added.id)] = reason

    def validate(self, frame: pd.DataFrame) -> list[RowFailure]:
        """Return one failure per (row, expectation) that the frame violates.

        Same answer as :meth:`validate_with_gx`, in the same order (GX groups results by
        column, columns in order of first use), without GX's per-call cost.
        """
        if frame.empty:
            return []
        frame = frame.reset_index(drop=True)
        failures: list[RowFailure] = []
        columns = [e.configuration.kwargs.get("column") for e in self.suite.expectations]
        by_column = sorted(range(len(columns)), key=lambda i: (columns.index(columns[i]), i))
        for expectation in (self.suite.expectations[i] for i in by_column):
            cfg = expectation.configuration
            unexpected = _UNEXPECTED.get(cfg.type)
            if unexpected is None or cfg.kwargs.get("mostly", 1) != 1:
                return self.validate_with_gx(frame)
            reason = self._reasons[str(expectation.id)]
            detail = f"failed {cfg.type}({cfg.kwargs.get('column')})"
            rows = unexpected(frame[cfg.kwargs["column"]], cfg.kwargs)
            failures.extend(RowFailure(int(row), reason, detail) for row in rows)
        return failures

    def validate_with_gx(self, frame: pd.DataFrame) -> list[RowFailure]:
        """:meth:`validate` through great-expectations itself (the reference semantics).

        Raises:
            RuntimeError: an expectation could not be evaluated at all (a bug, not bad data).
        """
        if frame.empty:
            return []
        frame = frame.reset_index(drop=True).assign(**{ROW_INDEX: range(len(frame))})
        batch = self.batch_definition.get_batch(batch_parameters={"dataframe": frame})
        result = batch.validate(
            self.suite,
            result_format={
                "result_format": "COMPLETE",
                "unexpected_index_column_names": [ROW_INDEX],
            },
        )
        failures: list[RowFailure] = []
        for res in result.results:
            cfg = res.expectation_config
            if res.exception_info and res.exception_info.get("raised_exception"):
                raise RuntimeError(
                    f"expectation {cfg.type} failed to run: "
                    f"{res.exception_info.get('exception_message')}"
                )
            if res.success:
                continue
            reason = self._reasons[str(cfg.id)]
            detail = f"failed {cfg.type}({cfg.kwargs.get('column')})"
            for item in res.result.get("unexpected_index_list") or []:
                failures.append(RowFailure(int(item[ROW_INDEX]), reason, detail))
        return failures


def _between(values: pd.Series, kwargs: dict) -> pd.Series:
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    ok = pd.Series(True, index=values.index)
    if low is not None:
        ok &= values > low if kwargs.get("strict_min") else values >= low
    if high is not None:
        ok &= values < high if kwargs.get("strict_max") else values <= high
    return ok


def _rows(mask: pd.Series) -> list[int]:
    return mask.to_numpy().nonzero()[0].tolist()


_UNEXPECTED: dict[str, Callable[[pd.Series, dict], list[int]]] = {
    "expect_column_values_to_not_be_null": lambda col, kw: _rows(col.isna()),
    "expect_column_values_to_match_regex": lambda col, kw: _rows(
        col.notna() & ~col.astype("string").str.contains(kw["regex"], regex=True).fillna(True)
    ),
    "expect_column_value_lengths_to_be_between": lambda col, kw: _rows(
        col.notna() & ~_between(col.astype("string").str.len(), kw).fillna(True)
    ),
    "expect_column_values_to_be_between": lambda col, kw: _rows(
        col.notna() & ~_between(col, kw).fillna(True)
    ),
    "expect_column_values_to_be_unique": lambda col, kw: _rows(
        col.notna() & col.duplicated(keep=False)
    ),
}
"""Rows (positions) an expectation type finds unexpected, given the column and the kwargs."""
