"""great-expectations suite for the gate table a hygiene run writes to the ledger.

A gate decision is only as trustworthy as the table behind it: every check must name itself
once, carry the policy version that decided it, a boolean verdict, and finite numbers where it
compared numbers. A run whose gate table fails this suite is not allowed to produce an
approvable candidate (the flow records the failure and marks the gates failed).
"""

from __future__ import annotations

import logging

import pandas as pd

GATE_COLUMNS = ("name", "passed", "policy_version", "value_before", "value_after", "threshold")


def validate_gate_table(rows: pd.DataFrame) -> list[str]:
    """Validate gate-check rows; returns failure descriptions (empty = valid).

    Args:
        rows: One row per check with columns :data:`GATE_COLUMNS` (numbers may be null only
            for checks that compare no numbers, e.g. the audit check).
    """
    missing = [c for c in GATE_COLUMNS if c not in rows.columns]
    if missing:
        return [f"gate table lacks columns {missing}"]
    if rows.empty:
        return ["gate table is empty"]
    frame = rows[list(GATE_COLUMNS)].copy()
    frame["passed"] = frame["passed"].map(lambda v: v if isinstance(v, bool) else None)
    # Imported here: great-expectations takes seconds to import, and every hygiene run's
    # start-up would pay it long before its gates are validated.
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    for name in ("great_expectations", "great_expectations.data_context.types.base"):
        logging.getLogger(name).setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    asset = context.data_sources.add_pandas("gates").add_dataframe_asset("gate_checks")
    batch = asset.add_batch_definition_whole_dataframe("whole").get_batch(
        batch_parameters={"dataframe": frame}
    )
    e = gx.expectations
    expectations = [
        e.ExpectColumnValuesToNotBeNull(column="name"),
        e.ExpectColumnValuesToBeUnique(column="name"),
        e.ExpectColumnValuesToNotBeNull(column="passed"),
        e.ExpectColumnValuesToNotBeNull(column="policy_version"),
        e.ExpectColumnValuesToMatchRegex(column="policy_version", regex=r"\S"),
    ]
    for column in ("value_before", "value_after", "threshold"):
        numeric = pd.to_numeric(frame[column], errors="coerce")
        bad = frame[column].notna() & ~numeric.between(-1e300, 1e300)
        if bad.any():
            names = list(frame.loc[bad, "name"])
            return [f"{column} holds non-finite or non-numeric values: {names}"]
    failures = []
    for expectation in expectations:
        result = batch.validate(expectation)
        if not result.success:
            failures.append(
                f"{type(expectation).__name__}({expectation.column}): "
                f"{result.result.get('unexpected_count', '?')} unexpected"
            )
    return failures
