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


@users_app.command("remove")
def users_remove(
    name: Annotated[str, typer.Argument(help="The user to remove.")],
    workspace: WorkspaceOpt = None,
) -> None:
    """Remove a user: their token stops working and open dashboard sessions end at once."""
    from diffcurate.storage.users import UserError, UserStore

    try:
        UserStore(workspace_settings(workspace).layout.ledger_path).remove(name)
    except UserError as e:
        raise fail(str(e)) from e
    out.print(f"removed {name}; their past decisions and marks keep their name")


@users_app.command("set-role")
def users_set_role(
    name: Annotated[str, typer.Argument(help="The user to change.")],
    role: Annotated[str, typer.Argument(help="viewer | reviewer | approver.")],
    workspace: WorkspaceOpt = None,
) -> None:
    """Change a user's role; open dashboard sessions get the new role on their next request."""
    from diffcurate.storage.users import UserError, UserStore

    try:
        UserStore(workspace_settings(workspace).layout.ledger_path).set_role(name, role)
    except UserError as e:
        raise fail(str(e)) from e
    out.print(f"{name} is now {role}")


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8765,
    trusted_proxy: Annotated[
        list[str] | None,
        typer.Option(
            "--trusted-proxy",
            help="Address of a reverse proxy whose X-Forwarded-For names the client (for the "
            "login throttle); repeatable. Without it the socket's peer address is used and "
            "X-Forwarded-For is ignored.",
        ),
    ] = None,
    secure_cookie: Annotated[
        bool,
        typer.Option(
            "--secure-cookie",
            help="Mark the session cookies Secure (sent over HTTPS only): use it behind a TLS "
            "proxy.",
        ),
    ] = False,
    workspace: WorkspaceOpt = None,
) -> None:
    """Serve the review dashboard (flagged images, audit, gates, approvals) for a workspace."""
    import uvicorn

    from diffcurate.dashboards.app import create_app
    from diffcurate.storage.users import UserStore

    settings = workspace_settings(workspace)
    app = create_app(settings.workspace, secure_cookies=secure_cookie,
                     trusted_proxies=trusted_proxy or ())  # fmt: skip
    if not UserStore(settings.layout.ledger_path).list():
        err.print("[yellow]note:[/yellow] no users yet; add one with "
                  "`diffcurate users add NAME --role approver`")  # fmt: skip
    if host not in _LOCAL:
        err.print(f"[yellow]warning:[/yellow] serving on {host} over plain HTTP: put it behind "
                  "a TLS proxy before anyone else can reach it")  # fmt: skip
    out.print(f"diffcurate review dashboard on http://{host}:{port}/ (workspace "
              f"{settings.workspace}); Ctrl-C stops it")  # fmt: skip
    # The app reads X-Forwarded-For itself, from trusted proxies only: uvicorn's own handling
    # trusts any peer on 127.0.0.1, which lets a local client forge its address.
    uvicorn.run(app, host=host, port=port, log_level="warning", proxy_headers=False)
