"""``diffcurate release ...``: list, inspect, approve and reject candidate releases.

Approve and reject go through :mod:`diffcurate.curation.approval`, as the dashboard's forms do:
the rules (pending candidate, registered approver, comment, override, reviewer marks, the
workspace lock) live there. Exit codes: 0 done; 2 refused (unknown tag, already decided or
superseded, not an approver, no comment, failed gates or audit without ``--override``, bad
configuration), with the reason on stderr; 1 from ``show`` and ``list`` when a Lance tag no
longer matches the ledger (shown as ``tampered``) or the ledger's decisions hash chain is broken
(a decision row deleted or edited by hand). Everything printed from the ledger goes through
:func:`~diffcurate.cli.common.safe`. Heavy imports (lancedb) happen inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from diffcurate.cli.common import (
    CliGroup,
    WorkspaceOpt,
    err,
    fail,
    out,
    safe,
    workspace_settings,
)

release_app = typer.Typer(
    help="Candidate releases: tagged LanceDB versions of kept samples, awaiting approval.",
    cls=CliGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

ActorOpt = Annotated[
    str | None,
    typer.Option(
        "--actor", envvar="USER", help="Who decides [default: $USER].", show_default=False
    ),
]
CommentOpt = Annotated[str, typer.Option("--comment", "-c", help="Why (kept in the ledger).")]
# Manifest keys the `show` table prints in its own rows.
_SHOWN = frozenset(
    {"dataset", "tag", "n", "lance_table", "lance_version", "n_kept", "n_removed",
     "created_at", "created_by"}
)  # fmt: skip
TagArg = Annotated[str, typer.Argument(help="A candidate tag, e.g. digits-candidate-1.")]


def _open(workspace: Path | None):
    """Store and ledger of the workspace (settings and errors as in the main CLI)."""
    return _open_settings(workspace_settings(workspace))


def _open_settings(settings):
    from diffcurate.storage.lance_store import LanceStore
    from diffcurate.storage.ledger import Ledger

    return LanceStore.open(settings.layout), Ledger(settings.layout.ledger_path)


def _refuse(e: Exception) -> typer.Exit:
    return fail(str(e), code=2)


def _info_dict(info) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(info)


@release_app.command("list")
def list_(
    dataset: Annotated[str | None, typer.Option(help="Only this dataset.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    workspace: WorkspaceOpt = None,
) -> None:
    """List candidates and releases, oldest first, with their status.

    Each Lance tag is checked against the ledger (moved or deleted tags show as `tampered`),
    and so is the decisions hash chain; either problem exits 1.
    """
    from diffcurate.storage import releases as rel

    store, ledger = _open(workspace)
    infos = rel.list_releases(ledger, dataset)
    problems = rel.tag_problems(store, ledger, dataset)
    chain = ledger.decision_chain_problems()
    if as_json:
        doc = [{**_info_dict(i), "problem": problems.get(i.tag)} for i in infos]
        out.print_json(json.dumps(doc, default=str))
    elif not infos:
        out.print("no candidate releases yet")
    else:
        # Tags are copied into commands: never wrap them.
        t = Table(Column("tag", no_wrap=True), "status", "kept", "removed", "version",
                  "created", "by")  # fmt: skip
        for i in infos:
            status = "[red]tampered[/red]" if i.tag in problems else i.status
            t.add_row(safe(i.tag), status, str(i.n_kept), str(i.n_removed),
                      str(i.lance_version), f"{i.created_at:%Y-%m-%d %H:%M}",
                      safe(i.created_by))  # fmt: skip
        out.print(t)
    _report_tampering(problems, chain)


def _report_tampering(problems: dict[str, str], chain: list[str]) -> None:
    """Print each tampered tag and chain problem on stderr; exit 1 when there is any."""
    for tag, problem in problems.items():
        err.print(f"[red]tampered:[/red] {safe(tag)}: {safe(problem)}")
    if chain:
        err.print(
            "[red]error:[/red] the ledger's decisions were altered outside diffcurate: "
            + safe("; ".join(chain))
        )
    if problems or chain:
        raise typer.Exit(1)


@release_app.command()
def show(
    tag: Annotated[str, typer.Argument(help="A candidate or release tag.")],
    ids: Annotated[bool, typer.Option("--ids", help="Also print kept and removed ids.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    workspace: WorkspaceOpt = None,
) -> None:
    """Show a tag's manifest (runs, audit, gates), its decisions, and check the Lance tag."""
    from diffcurate.storage import releases as rel

    store, ledger = _open(workspace)
    try:
        shown = rel.show_release(ledger, tag)
    except rel.ReleaseError as e:
        raise _refuse(e) from e
    try:
        rel.verify(store, ledger, tag)
        problem = None
    except rel.ReleaseError as e:
        problem = str(e)
    chain = ledger.decision_chain_problems()
    manifest = dict(shown["manifest"])
    if not ids:
        manifest.pop("kept_ids", None)
        manifest.pop("removed_ids", None)
    if as_json:
        doc = {
            "info": _info_dict(shown["info"]),
            "manifest": manifest,
            "decisions": shown["decisions"],
            "intact": problem is None and not chain,
            "problem": problem,
            "chain_problems": chain,
        }
        out.print_json(json.dumps(doc, default=str))
    else:
        info = shown["info"]
        t = Table(title=safe(f"{info.kind} {info.tag}"), show_header=False)
        t.add_row("status", "[red]tampered[/red]" if problem else info.status)
        t.add_row("dataset", safe(info.dataset))
        t.add_row("kept / removed", f"{info.n_kept} / {info.n_removed}")
        t.add_row("lance", safe(f"{info.lance_table} version {info.lance_version}"))
        t.add_row("created", safe(f"{info.created_at:%Y-%m-%d %H:%M:%S} by {info.created_by}"))
        t.add_row("tag check", "ok" if problem is None else f"[red]{safe(problem)}[/red]")
        t.add_row("decisions chain", "ok" if not chain else f"[red]{safe('; '.join(chain))}[/red]")
        for key, value in manifest.items():  # provenance: runs, audit, gates, samples version
            if key not in _SHOWN:
                t.add_row(safe(key), safe(value if isinstance(value, str) else json.dumps(value)))
        out.print(t)
        d = Table("when", "action", "actor", "role", "comment", title="decisions")
        for row in shown["decisions"]:
            d.add_row(f"{row['created_at']:%Y-%m-%d %H:%M:%S}", safe(row["action"]),
                      safe(row["actor"]), safe(row["role"]), safe(row["comment"]))  # fmt: skip
        out.print(d if shown["decisions"] else "no decisions yet")
    if problem is not None:
        err.print(f"[red]error:[/red] {safe(problem)}")
    _report_tampering({}, chain)
    if problem is not None:
        raise typer.Exit(1)


def _actor(actor: str | None) -> str:
    if not actor or not actor.strip():
        raise fail("no --actor given and $USER is unset: say who decides")
    return actor.strip()


@release_app.command()
def approve(
    tag: TagArg,
    actor: ActorOpt = None,
    comment: CommentOpt = "",
    override: Annotated[
        bool, typer.Option("--override", help="Approve despite failed gates (needs --comment).")
    ] = False,
    workspace: WorkspaceOpt = None,
) -> None:
    """Approve a pending candidate: tag its version `DATASET-release-N` (immutable)."""
    from diffcurate.curation import approval

    who = _actor(actor)
    settings = workspace_settings(workspace)
    try:
        # Open the ledger under the lock: a waiting process stays off DuckDB's file lock.
        with approval.decision_lock(settings.layout.ledger_path):
            store, ledger = _open_settings(settings)
            done = approval.approve(store, ledger, tag, who, comment, override=override)
    except approval.ApprovalRefused as e:
        raise _refuse(e) from e
    if done.completed_interrupted:
        out.print(f"completed the interrupted approval of {safe(tag)}")
    if done.approved != tag:
        note = (f"applied {done.marks_applied} reviewer marks to {tag}: new candidate "
                f"{done.approved} (supersedes {tag}; its gates were not measured)")  # fmt: skip
        out.print(safe(note))
    info = done.release
    out.print(safe(
        f"approved {done.approved} by {who}: released as {info.tag} "
        f"({info.lance_table} version {info.lance_version}, {info.n_kept} samples)"
    ))  # fmt: skip


@release_app.command()
def reject(
    tag: TagArg,
    actor: ActorOpt = None,
    comment: CommentOpt = "",
    workspace: WorkspaceOpt = None,
) -> None:
    """Reject a pending candidate; it is never released."""
    from diffcurate.curation import approval

    who = _actor(actor)
    settings = workspace_settings(workspace)
    try:
        with approval.decision_lock(settings.layout.ledger_path):
            store, ledger = _open_settings(settings)
            approval.reject(store, ledger, tag, who, comment)
    except approval.ApprovalRefused as e:
        raise _refuse(e) from e
    out.print(safe(f"rejected {tag} by {who}"))
