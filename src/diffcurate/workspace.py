"""The workspace layout: every path a run reads or writes, defined once.

Everything diffcurate writes lives under one workspace directory, so a workspace can be
copied, archived or deleted as a unit. Flows, tasks, the CLI and the dashboard ask a
:class:`Workspace` for a path instead of joining names themselves, so the layout changes in
one place.

::

    WORKSPACE/
      lancedb/                  LanceDB tables (samples, quarantine, scores, sketches, ...)
      ledger.duckdb             the ledger: runs, audits, gates, releases, decisions, users
      release.lock              held while a release decision is recorded
      models/NAME/              trained models (reference training, hygiene candidates)
      runs/RUN_ID/gate/         a hygiene run's gate images (before/, after/)
      cache/                    scorer state: ekfac/ factors, bif/ chains, runs/RUN_ID/state.pt
      artifacts/                reports and figures
      .prefect/                 Prefect's home in ephemeral mode
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    """The paths of one workspace directory (nothing is created until a writer needs it)."""

    root: Path

    LANCEDB = "lancedb"
    LEDGER = "ledger.duckdb"
    RELEASE_LOCK = "release.lock"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def resolved(self) -> Workspace:
        """The same workspace with an absolute root: what workers on other hosts or in other
        working directories are given (over a shared file system or mount)."""
        return Workspace(self.root.resolve())

    @property
    def lancedb_uri(self) -> str:
        return str(self.root / self.LANCEDB)

    @property
    def ledger_path(self) -> Path:
        return self.root / self.LEDGER

    @property
    def release_lock(self) -> Path:
        return self.root / self.RELEASE_LOCK

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def model_dir(self, name: str) -> Path:
        """A named model (``diffcurate train --name``)."""
        return self.models_dir / name

    def hygiene_model_dir(self, dataset: str, run_id: str) -> Path:
        """The mitigated candidate model a hygiene run saves."""
        return self.models_dir / f"{dataset}-hygiene-{run_id}"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def gate_dir(self, run_id: str) -> Path:
        """A hygiene run's gate images (``before/`` and ``after/`` the mitigation)."""
        return self.runs_dir / run_id / "gate"

    @property
    def cache_dir(self) -> Path:
        """Scorer state reused across runs (EK-FAC factors, BIF chains, run states)."""
        return self.root / "cache"

    def run_state_path(self, run_id: str) -> Path:
        """A score run's saved dataset-level state, which distributed workers load."""
        return self.cache_dir / "runs" / run_id / "state.pt"

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "artifacts"

    @property
    def prefect_home(self) -> Path:
        return self.root / ".prefect"
