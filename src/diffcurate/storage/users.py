"""Dashboard users: a name, a role and the SHA-256 hash of a bearer token, in the ledger DB.

Tokens are 256-bit random strings shown once when the user is created; only their hash is
stored, so a copy of ``ledger.duckdb`` does not let anyone log in. Roles are ordered: a
reviewer can do what a viewer can, an approver what a reviewer can.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from diffcurate.storage.ledger import Ledger

ROLES = ("viewer", "reviewer", "approver")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


class UserError(ValueError):
    """A user could not be created or changed (bad name or role, name taken, no such user)."""


@dataclass(frozen=True)
class User:
    name: str
    role: str

    def can(self, role: str) -> bool:
        """True when this user's role is ``role`` or above it."""
        return ROLES.index(self.role) >= ROLES.index(role)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class UserStore:
    """The ``users`` table of the ledger database (created, like every ledger table, by
    :class:`~diffcurate.storage.ledger.Ledger`, which opening the store ensures)."""

    def __init__(self, ledger_path: Path) -> None:
        self.ledger = Ledger(ledger_path)
        self.path = self.ledger.path

    def add(self, name: str, role: str, created_by: str = "cli") -> str:
        """Create a user; returns the token (the only time it exists outside the user's hands)."""
        if not _NAME.match(name):
            raise UserError(
                f"invalid user name {name!r}: use 1-64 letters, digits, '_', '.', '@', '-'"
            )
        if role not in ROLES:
            raise UserError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
        token = "dct_" + secrets.token_urlsafe(32)
        try:
            with self.ledger.connect() as con:
                con.execute(
                    "INSERT INTO users VALUES (?, ?, ?, ?, ?)",
                    [name, role, hash_token(token), datetime.now(UTC), created_by],
                )
        except duckdb.ConstraintException as e:
            raise UserError(f"user {name!r} already exists") from e
        return token

    def authenticate(self, token: str) -> User | None:
        """The user holding ``token``, or None."""
        if not token or len(token) > 200:
            return None
        return self.by_token_hash(hash_token(token))

    def by_token_hash(self, token_hash: str) -> User | None:
        """The user whose token hashes to ``token_hash`` now, or None.

        The dashboard asks on every request, so a removed user's session ends and a changed
        role applies at once.
        """
        if not token_hash:
            return None
        with self.ledger.connect(read_only=True) as con:
            row = con.execute(
                "SELECT name, role FROM users WHERE token_hash = ?", [token_hash]
            ).fetchone()
        return None if row is None else User(name=row[0], role=row[1])

    def remove(self, name: str) -> None:
        """Delete a user: their token stops working and their open sessions end.

        Their past decisions and marks keep their name (the ledger is append-only).
        """
        with self.ledger.connect() as con:
            gone = con.execute("DELETE FROM users WHERE name = ? RETURNING name", [name]).fetchall()
        if not gone:
            raise UserError(f"no user {name!r}")

    def set_role(self, name: str, role: str) -> None:
        """Change a user's role; it applies to their open sessions from the next request."""
        if role not in ROLES:
            raise UserError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
        with self.ledger.connect() as con:
            done = con.execute(
                "UPDATE users SET role = ? WHERE name = ? RETURNING name", [role, name]
            ).fetchall()
        if not done:
            raise UserError(f"no user {name!r}")

    def list(self) -> list[dict]:
        with self.ledger.connect(read_only=True) as con:
            cur = con.execute("SELECT name, role, created_at, created_by FROM users ORDER BY name")
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
