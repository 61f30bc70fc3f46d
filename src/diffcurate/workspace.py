"""The workspace layout: every path a run reads or writes, defined once.

Everything diffcurate writes lives under one workspace directory, so a workspace can be
copied, archived or deleted as a unit (the LanceDB tables too, unless ``tables.uri`` puts them
elsewhere). Flows, tasks, the CLI and the dashboard ask a
:class:`Workspace` for a path instead of joining names themselves, so the layout changes in
one place.

::

    WORKSPACE/
      lancedb/                  LanceDB tables (samples, quarantine, scores, sketches, ...)
      tables.json               where the tables live when they are not in lancedb/ (s3://...)
      ledger.duckdb             the ledger: runs, audits, gates, releases, decisions, users
      release.lock              held while a release decision is recorded
      models/NAME/              trained models (reference training, hygiene candidates)
      runs/RUN_ID/gate/         a hygiene run's gate images (before/, after/)
      cache/                    scorer state: ekfac/ factors, bif/ chains, runs/RUN_ID/state.pt
      artifacts/                reports and figures
      .prefect/                 Prefect's home in ephemeral mode

The LanceDB tables may live elsewhere (``tables.uri``: an ``s3://``, ``gs://``, ``az://`` URI or
another directory) while the ledger, locks, models and caches stay in the local root: DuckDB
needs a local file, while Lance commits each table version with a put-if-not-exists that object
stores provide. The workspace records that location in ``tables.json`` when it is first bound,
so every process handed only the root (a flow, the dashboard, a later command) opens the same
tables, and a run started without the setting cannot silently write a second, local set beside
them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Credentials never go into settings files or tables.json: each store's own environment
# variables (AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_ACCOUNT_KEY, ...)
# carry them, and Lance's object store reads those.
_CREDENTIAL_KEY = re.compile(r"secret|token|password|key_id|account_key|sas_key|credential", re.I)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class TablesLocationError(ValueError):
    """The tables location asked for disagrees with the one the workspace already uses."""


def is_local_uri(uri: str) -> bool:
    """Whether ``uri`` names a local directory (a plain path or ``file://``)."""
    return _SCHEME.match(uri) is None or uri.startswith("file://")


def check_storage_options(options: Mapping[str, str]) -> dict[str, str]:
    """The storage options as plain strings; refuses credentials (see module docstring)."""
    secret = sorted(k for k in options if _CREDENTIAL_KEY.search(k))
    if secret:
        raise ValueError(
            f"storage options {secret} look like credentials: pass them in the store's "
            "environment variables (e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), never in "
            "settings, which are printed and recorded"
        )
    return {str(k): str(v) for k, v in options.items()}


@dataclass(frozen=True)
class Workspace:
    """The paths of one workspace directory (nothing is created until a writer needs it).

    Args:
        root: The local workspace directory.
        tables_uri: Where the LanceDB tables live; None: where the workspace recorded them
            (``tables.json``), else ``root/lancedb``.
        storage_options: Object-store options for the tables (endpoint, region, allow_http,
            ...); None: the recorded ones. Never credentials.
    """

    root: Path
    tables_uri: str | None = None
    storage_options: Mapping[str, str] | None = field(default=None, compare=False)

    LANCEDB = "lancedb"
    TABLES_FILE = "tables.json"
    LEDGER = "ledger.duckdb"
    RELEASE_LOCK = "release.lock"

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        if self.tables_uri is not None and is_local_uri(self.tables_uri):
            local = self.tables_uri.removeprefix("file://")
            object.__setattr__(self, "tables_uri", str(Path(local).expanduser().absolute()))
        if self.storage_options is not None:
            object.__setattr__(self, "storage_options", check_storage_options(self.storage_options))

    def resolved(self) -> Workspace:
        """The same workspace with an absolute root: what workers on other hosts or in other
        working directories are given (over a shared file system or mount)."""
        return Workspace(self.root.resolve(), self.tables_uri, self.storage_options)

    @property
    def tables_file(self) -> Path:
        return self.root / self.TABLES_FILE

    def _recorded(self) -> dict | None:
        if not self.tables_file.is_file():
            return None
        return json.loads(self.tables_file.read_text())

    @property
    def lancedb_uri(self) -> str:
        """The LanceDB database URI: a local directory or an object-store URI.

        Raises:
            TablesLocationError: ``tables_uri`` differs from the location recorded in the root.
        """
        recorded = self._recorded()
        if recorded is not None:
            if self.tables_uri is not None and self.tables_uri != recorded["uri"]:
                raise TablesLocationError(
                    f"workspace {self.root} keeps its tables at {recorded['uri']}, not "
                    f"{self.tables_uri} (recorded in {self.tables_file}; moving tables is not "
                    "supported)"
                )
            return recorded["uri"]
        return self.tables_uri or str(self.root / self.LANCEDB)

    @property
    def lance_storage_options(self) -> dict[str, str]:
        """The storage options every LanceDB connection and Lance dataset of the workspace
        is opened with: the given ones, else the recorded ones."""
        if self.storage_options is not None:
            return dict(self.storage_options)
        recorded = self._recorded()
        return dict(recorded.get("storage_options", {})) if recorded else {}

    def bind_tables(self) -> None:
        """Record a non-default tables location in the root, once (see the module docstring).

        Idempotent. Storage options given with or without the URI replace the recorded ones,
        so that processes handed only the root use them too.

        Raises:
            TablesLocationError: The workspace already uses another location, or holds local
                tables that the new location would hide.
        """
        local = self.root / self.LANCEDB
        recorded = self._recorded()
        if recorded is None and self.tables_uri in (None, str(local.absolute())):
            return
        uri = self.lancedb_uri  # checks a recorded location against ours
        options = self.lance_storage_options
        if recorded is not None and recorded.get("storage_options", {}) == options:
            return
        if recorded is None and local.is_dir() and any(local.iterdir()):
            raise TablesLocationError(
                f"workspace {self.root} already holds tables in {local}; a workspace keeps one "
                f"tables location (use a new workspace for {uri})"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.tables_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"uri": uri, "storage_options": options}, indent=2) + "\n")
        os.replace(tmp, self.tables_file)

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
