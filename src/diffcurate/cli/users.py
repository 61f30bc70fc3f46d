"""``diffcurate serve`` and ``diffcurate users ...``: the review app and its users.

Heavy imports (fastapi, uvicorn, duckdb) happen inside the commands.
"""

from __future__ import annotations

from typing import Annotated

import typer

from diffcurate.cli.common import CliGroup, WorkspaceOpt, err, fail, out, workspace_settings

users_app = typer.Typer(
    help="Dashboard users: token-based, with a role (viewer, reviewer or approver).",
    cls=CliGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

_LOCAL = {"127.0.0.1", "localhost", "::1"}


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="User name (letters, digits, _ . @ -).")],
    role: Annotated[str, typer.Option("--role", help="viewer | reviewer | approver.")],
    workspace: WorkspaceOpt = None,
) -> None:
    """Create a user and print their token (once: only its SHA-256 hash is stored)."""
    from diffcurate.storage.users import UserError, UserStore

    settings = workspace_settings(workspace)
    try:
        token = UserStore(settings.layout.ledger_path).add(name, role)
    except UserError as e:
        raise fail(str(e)) from e
    out.print(f"created {role} {name}; their token (shown only now, store it safely):")
    out.print(token, markup=False, highlight=False)


@users_app.command("list")
def users_list(workspace: WorkspaceOpt = None) -> None:
    """List users and their roles (never tokens)."""
    from rich.table import Table

    from diffcurate.storage.users import UserStore

    rows = UserStore(workspace_settings(workspace).layout.ledger_path).list()
    if not rows:
        out.print("no users yet: add one with diffcurate users add NAME --role ROLE")
        return
    t = Table("name", "role", "created (UTC)", "by")
    for r in rows:
        t.add_row(r["name"], r["role"], f"{r['created_at']:%Y-%m-%d %H:%M}", r["created_by"])
    out.print(t)


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8765,
    workspace: WorkspaceOpt = None,
) -> None:
    """Serve the review dashboard (flagged images, audit, gates, approvals) for a workspace."""
    import uvicorn

    from diffcurate.dashboards.app import create_app
    from diffcurate.storage.users import UserStore

    settings = workspace_settings(workspace)
    app = create_app(settings.workspace)
    if not UserStore(settings.layout.ledger_path).list():
        err.print("[yellow]note:[/yellow] no users yet; add one with "
                  "`diffcurate users add NAME --role approver`")  # fmt: skip
    if host not in _LOCAL:
        err.print(f"[yellow]warning:[/yellow] serving on {host} over plain HTTP: put it behind "
                  "a TLS proxy before anyone else can reach it")  # fmt: skip
    out.print(f"diffcurate review dashboard on http://{host}:{port}/ (workspace "
              f"{settings.workspace}); Ctrl-C stops it")  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level="warning")
