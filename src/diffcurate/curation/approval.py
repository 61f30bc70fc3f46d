"""Approving and rejecting candidate releases: the one definition of the rules.

``diffcurate release approve|reject`` and the dashboard's approve/reject forms both call
:func:`approve` and :func:`reject`; neither front end checks a rule of its own. A decision is
refused (:class:`ApprovalRefused`, nothing changed) unless:

* the tag names a *pending candidate*: not a release, not already approved or rejected, and
  not superseded by a candidate that applied reviewer marks to it (decide on that one);
* the actor may decide: when the workspace has users (``diffcurate users add``), the actor must
  be one of them with the ``approver`` role, and the decision is recorded with that role. A
  workspace without users is single-user: any non-empty name decides, recorded as
  ``approver``. The CLI does not authenticate (whoever can write ``ledger.duckdb`` can write
  anything in it); the check keeps decisions attributed to known approvers;
* a comment says why (it is kept in the ledger);
* a candidate whose gates or fairness audit failed, or whose gates were not measured on its
  own sets (reviewer marks change them), is approved only with an explicit override with a
  reason, recorded as its own ``override`` decision;
* the ledger's decisions hash chain verifies (:meth:`~.Ledger.decision_chain_problems`): on a
  ledger whose decisions were deleted or edited by hand, nothing is decided or marked.

Approving first applies the candidate's reviewer marks (:func:`~.reviews.apply_marks`): when
they change its kept/removed sets, a new candidate is written and approved instead, and the
original is superseded.

Concurrency and crashes: a decision holds an exclusive lock on ``release.lock`` in the workspace
(``fcntl.flock``; threads of one process queue too) from its first read to its last write, so of
two simultaneous approvals one releases and the other finds the candidate already approved.
Approval creates the Lance release tag, then writes its decisions and release row in one ledger
transaction. A crash between the two leaves a pending candidate whose release tag exists;
:func:`~diffcurate.storage.releases.verify` (``diffcurate release show``) reports it, rejection
is refused, and approving again completes it (reviewer marks are not re-applied then: the tag
already names the candidate's version).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from diffcurate.storage import releases as rel
from diffcurate.storage import reviews
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger
from diffcurate.storage.locks import LockTimeout, exclusive
from diffcurate.storage.users import User, UserStore
from diffcurate.workspace import Workspace

LOCK_TIMEOUT_S = 120.0
Reason = Literal["not_found", "invalid", "forbidden", "conflict"]


class ApprovalRefused(Exception):
    """A decision was refused; nothing was changed.

    Attributes:
        reason: which kind of rule refused it, for front ends that map it to a status:
            ``not_found`` (unknown tag), ``invalid`` (missing comment or actor), ``forbidden``
            (actor not an approver), ``conflict`` (the candidate's state forbids it).
    """

    def __init__(self, message: str, reason: Reason) -> None:
        super().__init__(message)
        self.reason: Reason = reason


@dataclass(frozen=True)
class Approval:
    """What :func:`approve` did."""

    requested: str
    """The candidate the approver named."""
    approved: str
    """The candidate approved: ``requested``, or the new one with reviewer marks applied."""
    release: rel.ReleaseInfo
    marks_applied: int
    """Reviewer marks that changed the sets (0 when ``approved == requested``)."""
    completed_interrupted: bool
    """True when this call finished an approval that had crashed after tagging."""


def lock_path(ledger_path: Path) -> Path:
    """The workspace's decision lock file (beside ``ledger.duckdb``)."""
    return Workspace(Path(ledger_path).parent).release_lock


@contextmanager
def decision_lock(ledger_path: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the workspace's decision lock. Reentrant for the holding thread.

    :func:`approve` and :func:`reject` take it themselves; a caller that must also open the
    ledger under it (a second process would otherwise race the holder for DuckDB's file lock)
    takes it around both.

    Raises:
        ApprovalRefused: (conflict) the lock stayed held for ``timeout`` seconds.
    """
    with ExitStack() as stack:
        try:
            stack.enter_context(exclusive(lock_path(ledger_path), timeout))
        except LockTimeout as e:
            raise ApprovalRefused(
                f"another approval or rejection in this workspace is still running ({e}); "
                "try again",
                "conflict",
            ) from e
        yield


NOT_MEASURED = "has gates not measured on its sets (reviewer marks change what it keeps)"


def failed_checks(manifest: dict[str, Any], marks_pending: bool = False) -> list[str]:
    """Why a candidate needs an override (phrases completing "the candidate ...").

    Args:
        marks_pending: reviewer marks on it would change its sets when applied, so its gates
            would no longer cover the candidate approved.
    """
    failed = []
    if manifest.get("gates_measured") is False or marks_pending:
        failed.append(NOT_MEASURED)
    elif manifest.get("gate_passed") is False:
        failed.append("failed its gates")
    audit = manifest.get("audit")
    if isinstance(audit, dict) and audit.get("passed") is False:
        failed.append("failed its fairness audit")
    return failed


def pending_candidate(ledger: Ledger, tag: str) -> dict[str, Any]:
    """The ledger row of a candidate that can still be marked and decided.

    Raises:
        ApprovalRefused: unknown tag (not_found); a release, decided or superseded, or a ledger
            whose decisions hash chain is broken (conflict).
    """
    if problems := ledger.decision_chain_problems():
        raise ApprovalRefused(
            "refusing to act: the ledger's decisions were altered outside diffcurate ("
            + "; ".join(problems)
            + "); restore ledger.duckdb from a backup",
            "conflict",
        )
    try:
        row = ledger.release(tag)
    except KeyError:
        raise ApprovalRefused(f"no candidate or release tagged {tag!r}", "not_found") from None
    if row["kind"] != "candidate":
        raise ApprovalRefused(
            f"{tag!r} is a release, not a candidate: decisions are taken on candidates "
            f"({rel.candidate_tag(row['dataset'], row['n'])})",
            "conflict",
        )
    status = rel.show(ledger, tag).status
    if status != "pending":
        raise ApprovalRefused(
            f"{tag!r} is already {status}; a candidate is decided once", "conflict"
        )
    if (newer := reviews.superseded_by(ledger, tag)) is not None:
        raise ApprovalRefused(
            f"{tag!r} was superseded by {newer!r} (its reviewer marks applied); decide on that one",
            "conflict",
        )
    return row


def resolve_actor(ledger: Ledger, actor: str | None) -> User:
    """Who decides, with the role recorded (see the module docstring for the rule).

    Raises:
        ApprovalRefused: no name (invalid); not a registered approver (forbidden).
    """
    name = (actor or "").strip()
    if not name:
        raise ApprovalRefused("no actor: say who decides", "invalid")
    users = {u["name"]: u["role"] for u in UserStore(ledger.path).list()}
    if not users:
        return User(name=name, role=rel.APPROVER)
    if name not in users:
        raise ApprovalRefused(
            f"unknown actor {name!r}: this workspace has users, and only a registered approver "
            f"decides (diffcurate users add {name} --role approver)",
            "forbidden",
        )
    user = User(name=name, role=users[name])
    if not user.can(rel.APPROVER):
        raise ApprovalRefused(
            f"{name!r} is a {user.role}; only an approver may approve or reject", "forbidden"
        )
    return user


def _need_comment(comment: str, verb: str) -> str:
    text = comment.strip()
    if not text:
        raise ApprovalRefused(
            f"say why you {verb}: a decision needs a comment (it is kept in the ledger)",
            "invalid",
        )
    return text


def _refused(e: rel.ReleaseError | reviews.ReviewError) -> ApprovalRefused:
    reason: Reason = "not_found" if isinstance(e, rel.ReleaseNotFound) else "conflict"
    return ApprovalRefused(str(e), reason)


def approve(
    store: LanceStore,
    ledger: Ledger,
    tag: str,
    actor: str | None,
    comment: str,
    *,
    override: bool = False,
    override_reason: str = "",
    lock_timeout: float = LOCK_TIMEOUT_S,
) -> Approval:
    """Approve a pending candidate (after applying its reviewer marks): tag the release.

    Args:
        override: approve despite failed gates or audit (the comment is the reason).
        override_reason: a separate reason for the override; implies ``override``. It is
            appended to the recorded comment.

    Raises:
        ApprovalRefused: any rule refused it (see the module docstring); nothing changed.
    """
    with decision_lock(ledger.path, lock_timeout):
        row = pending_candidate(ledger, tag)
        user = resolve_actor(ledger, actor)
        text = _need_comment(comment, "approve")
        reason = override_reason.strip()
        try:
            interrupted = rel.interrupted_approval(store, ledger, tag) is not None
        except rel.ReleaseError as e:
            raise _refused(e) from e
        marks_pending = not interrupted and bool(reviews.pending_changes(ledger, tag))
        failed = failed_checks(row["manifest"], marks_pending)
        if failed and not (override or reason):
            raise ApprovalRefused(
                f"{tag!r} {' and '.join(failed)}: approving it needs an explicit "
                "override with a reason, which is recorded",
                "conflict",
            )
        if failed and reason:
            text = f"{text} | override reason: {reason}"
        target, n_marks = tag, 0
        try:
            if marks_pending:
                newer = reviews.apply_marks(store, ledger, tag, user.name)
                if newer is not None:
                    target = newer.tag
                    n_marks = len(ledger.release(target)["manifest"].get("overrides", []))
            info = rel.approve(store, ledger, target, user.name, text, role=user.role,
                               override=bool(failed))  # fmt: skip
        except (rel.ReleaseError, reviews.ReviewError) as e:
            raise _refused(e) from e
    return Approval(requested=tag, approved=target, release=info, marks_applied=n_marks,
                    completed_interrupted=interrupted)  # fmt: skip


def reject(
    store: LanceStore,
    ledger: Ledger,
    tag: str,
    actor: str | None,
    comment: str,
    *,
    lock_timeout: float = LOCK_TIMEOUT_S,
) -> rel.ReleaseInfo:
    """Reject a pending candidate; it is never released. Reviewer marks are not applied.

    Raises:
        ApprovalRefused: any rule refused it (see the module docstring); nothing changed.
    """
    with decision_lock(ledger.path, lock_timeout):
        pending_candidate(ledger, tag)
        user = resolve_actor(ledger, actor)
        text = _need_comment(comment, "reject")
        try:
            return rel.reject(store, ledger, tag, user.name, text, role=user.role)
        except rel.ReleaseError as e:
            raise _refused(e) from e
