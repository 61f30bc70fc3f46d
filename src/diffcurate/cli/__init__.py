"""The ``diffcurate`` command line: one module per command group, assembled here.

Commands are registered below in the order ``--help`` lists them. Heavy imports (torch,
prefect, lancedb) happen inside commands, after the workspace is known, so ``--help`` is
instant and ``PREFECT_HOME`` points into the workspace before Prefect loads.

Modules: :mod:`.common` (consoles, settings, errors, shared options), :mod:`.checks` (the
refusals made before any heavy import: workspace, model files, datasets), :mod:`.ingest`,
:mod:`.score` (score, attribute), :mod:`.train` (train, sample), :mod:`.run` (run, eval),
:mod:`.attributes` (audit-attributes), :mod:`.demo`, :mod:`.info` (runs, scores, quarantine,
datasets, config), :mod:`.release`,
:mod:`.users` (users, serve) and :mod:`.deploy`.
"""

from __future__ import annotations

import typer

from diffcurate.cli import attributes, demo, info, ingest, run, score, train
from diffcurate.cli.common import CliGroup
from diffcurate.cli.deploy import deploy_app
from diffcurate.cli.release import release_app
from diffcurate.cli.users import serve, users_app

app = typer.Typer(
    name="diffcurate",
    cls=CliGroup,
    help=(
        "Data curation for diffusion-model training sets: ingest image–caption corpora into "
        "LanceDB, score memorization risk, audit, and gate releases.\n\n"
        "Settings come from --workspace, DIFFCURATE_* environment variables "
        "(e.g. DIFFCURATE_CLIP__CHECKPOINT=/models/clip.pt) and ./diffcurate.toml."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # reflow docstring paragraphs instead of keeping hard breaks
)

app.command("ingest")(ingest.ingest)
app.command("score")(score.score)
app.command("attribute")(score.attribute)
app.command("scores")(info.scores)
app.command("train")(train.train)
app.command("sample")(train.sample)
app.command("run")(run.run_hygiene)
app.command("eval")(run.evaluate)
app.command("audit-attributes")(attributes.audit_attributes)
app.command("demo-corpus")(demo.demo_corpus)
app.command("runs")(info.runs)
app.command("quarantine")(info.quarantine)
app.command("datasets")(info.datasets)
app.command("config")(info.config)
app.add_typer(release_app, name="release", help="List, show, approve or reject candidate releases.")
app.add_typer(users_app, name="users", help="Add, list, remove or re-role review-dashboard users.")
app.command("serve")(serve)
app.add_typer(deploy_app, name="deploy", help="Work pools, deployments and schedules at scale.")


def main() -> None:  # pragma: no cover - console entry point
    app()
