"""great-expectations suites for ingest batches, built in code on an ephemeral context.

GX gives us declarative, reportable expectations; we use its COMPLETE result format to map each
failing row back to a quarantine reason. Decoding problems (corrupt files, bombs) are caught
earlier by the decoder: GX validates the *table* of decoded rows.
"""

from __future__ import annotations

import logging
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
