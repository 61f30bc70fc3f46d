"""``diffcurate audit-attributes``: infer group attributes of a dataset for the fairness audit.

Real image–caption corpora carry no demographic columns; this command labels every sample with
the configured inferred attributes (``attributes.*`` settings: CLIP zero-shot prompts, caption
keyword groups, face counts) and stores them, with what produced them, beside the metadata. The
hygiene run then audits them like metadata columns.
"""

from __future__ import annotations

from typing import Annotated

import typer
from pydantic import ValidationError
from rich.table import Table

from diffcurate.cli.checks import check_datasets
from diffcurate.cli.common import (
    ThreadsOpt,
    WorkspaceOpt,
    err,
    fail,
    out,
    safe,
    workspace_settings,
)


def audit_attributes(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset to label.")],
    no_faces: Annotated[
        bool, typer.Option("--no-faces", help="Skip the face count (attributes.faces).")
    ] = False,
    workspace: WorkspaceOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Infer group attributes of every sample: CLIP zero-shot, caption keywords, face count.

    What to infer comes from the `attributes` settings (`diffcurate.toml` or
    `DIFFCURATE_ATTRIBUTES__...`); the labels go to the LanceDB `inferred_attributes` table with
    the model that produced them and its fingerprint. Re-running with the same settings and
    weights writes nothing. Exit 2 when refused (unknown dataset, zero-shot prompts without a
    CLIP checkpoint, invalid settings).
    """
    settings = workspace_settings(workspace, threads, existing=True)
    check_datasets(settings, dataset)
    attrs = settings.attributes
    if no_faces:
        attrs = attrs.model_copy(update={"faces": False})
    if not (attrs.zero_shot or attrs.captions or attrs.faces):
        raise fail("nothing to infer: configure attributes.zero_shot or attributes.captions, "
                   "or leave attributes.faces on")  # fmt: skip
    from diffcurate.curation.inferred import infer_dataset
    from diffcurate.models.clip_embedder import EmbeddingsDisabledError
    from diffcurate.storage.lance_store import LanceStore
    from diffcurate.storage.ledger import Ledger

    store = LanceStore.open(settings.layout)
    ledger = Ledger(settings.layout.ledger_path)
    try:
        with ledger.recording("attributes", dataset=dataset,
                              params=attrs.model_dump(mode="json")) as run:  # fmt: skip
            report = infer_dataset(store, dataset, attrs, settings.clip, run.run_id,
                                   progress=lambda line: err.print(safe(line)))  # fmt: skip
            run.stats = lambda: report.model_dump(mode="json")
    except (ValidationError, ValueError, FileNotFoundError, EmbeddingsDisabledError) as e:
        raise fail(str(e)) from e
    t = Table("attribute", "source", "model", "groups (samples)", "written",
              title=f"inferred attributes of {safe(dataset)}")  # fmt: skip
    for a in report.attributes:
        groups = ", ".join(f"{g}: {n}" for g, n in a.counts.items())
        t.add_row(safe(a.attribute), a.source, safe(f"{a.model} [{a.fingerprint[:12]}]"),
                  safe(groups), str(a.written) if a.written else "0 (already stored)")  # fmt: skip
    out.print(t)
    same = [a.attribute for a in report.attributes if not a.written]
    if same:
        out.print(safe(f"already stored under the same fingerprint (nothing written): "
                       f"{', '.join(same)}"))  # fmt: skip
    for line in report.skipped:
        err.print(f"[yellow]skipped:[/yellow] {safe(line)}")
    out.print("these labels are inferred by the models named above, not facts about anyone; "
              "the audit reports them as inferred")  # fmt: skip
    if not report.attributes:
        raise typer.Exit(1)
