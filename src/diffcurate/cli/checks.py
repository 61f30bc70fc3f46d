"""Fast refusals: the arguments a command can check before torch, Prefect or a flow loads.

A flow command pays seconds of imports and an ephemeral Prefect server before its first step;
a mistyped ``--model``, an unknown dataset or a missing workspace must not wait behind that.
These checks read only the file system and, for datasets, one LanceDB row count, and end the
command with one line on stderr and exit code 2. What they accept still goes through the full
checks later (the model preflight loads the weights), so they may only refuse what would fail.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from diffcurate.cli.common import fail
from diffcurate.config import Settings
from diffcurate.models.errors import ModelLoadError
from diffcurate.models.model_files import check_model_files
from diffcurate.workspace import is_local_uri


def check_model(
    model: Path | None,
    *,
    config: Path | None = None,
    lora: Sequence[Path] | None = None,
    variant: str | None = None,
) -> None:
    """Refuse a model path that cannot load (see :mod:`diffcurate.models.model_files`)."""
    if model is None:
        return
    try:
        check_model_files(model, config=config, lora=lora or (), variant=variant)
    except ModelLoadError as e:
        raise fail(str(e)) from e


def check_datasets(settings: Settings, *datasets: str | None) -> None:
    """Refuse a dataset name that is invalid or has no ingested samples in the workspace."""
    from diffcurate.storage.schemas import validate_dataset_name

    names = [d for d in datasets if d is not None]
    try:
        for name in names:
            validate_dataset_name(name)
    except ValueError as e:
        raise fail(str(e)) from e
    if not names:
        return
    for name in names:
        if _sample_count(settings, name) == 0:
            raise fail(
                f"unknown dataset {name!r}: no ingested samples in workspace "
                f"{settings.workspace} (`diffcurate datasets` lists them)"
            )


def _sample_count(settings: Settings, dataset: str) -> int:
    """Rows of ``dataset`` in the ``samples`` table.

    Local tables are counted with ``lance`` (LanceDB's table ``NAME`` is the Lance dataset
    ``URI/NAME.lance``): importing lancedb costs several times as much as the count. Object
    stores go through :meth:`~diffcurate.storage.lance_store.LanceStore.open`, which knows
    their options.
    """
    layout = settings.layout
    uri = layout.lancedb_uri
    if is_local_uri(uri):
        table = Path(uri.removeprefix("file://")) / "samples.lance"
        if not table.is_dir():
            return 0
        import lance

        return lance.dataset(str(table)).count_rows(filter=f"dataset = '{dataset}'")
    from diffcurate.storage.lance_store import LanceStore

    return LanceStore.open(layout).count("samples", dataset)


def check_file(path: Path, what: str) -> None:
    """Refuse an input file that does not exist."""
    if not path.is_file():
        raise fail(f"{what} not found: {path}")
