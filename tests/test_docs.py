"""The README must describe what the code does: every command, option, reason and setting."""

import re
from pathlib import Path

import typer.main
from pydantic import BaseModel

from diffcurate.cli import app
from diffcurate.config import Settings
from diffcurate.storage.reasons import Reason

README = (Path(__file__).parents[1] / "README.md").read_text()


def _commands() -> dict[str, object]:
    group = typer.main.get_group(app)
    return dict(group.commands)


def test_every_command_is_documented():
    for name in _commands():
        assert f"diffcurate {name}" in README, name


def _leaf_commands(command, path: tuple[str, ...] = ()):
    """``(path, command)`` of every runnable command, inside groups (``release approve``) too."""
    if hasattr(command, "commands"):  # a group (typer may bring its own click)
        for name, sub in command.commands.items():
            yield from _leaf_commands(sub, (*path, name))
    else:
        yield path, command


def test_every_option_of_every_command_is_documented():
    missing = [
        f"diffcurate {' '.join(path)} {opt}"
        for path, command in _leaf_commands(typer.main.get_group(app))
        for param in command.params
        for opt in param.opts
        if opt.startswith("--") and not re.search(rf"{re.escape(opt)}\b", README)
    ]
    assert not missing, "\n".join(missing)


def test_the_walk_reaches_grouped_commands():
    paths = {path for path, _ in _leaf_commands(typer.main.get_group(app))}
    assert ("ingest",) in paths and any(len(p) == 2 for p in paths)


def test_every_quarantine_reason_is_in_the_table():
    documented = set(re.findall(r"^\| `([a-z_0-9]+)` \|", README, flags=re.M))
    assert {r.value for r in Reason} <= documented


def _setting_names(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            names += _setting_names(ann, f"{prefix}{name}.")
        else:
            names.append(f"{prefix}{name}")
    return names


def test_every_setting_is_in_the_table_with_its_default():
    defaults = Settings.model_construct()
    for name in _setting_names(Settings):
        row = re.search(rf"^\| `{re.escape(name)}` \| ([^|]+) \|", README, flags=re.M)
        assert row, name
        value = defaults
        for part in name.split("."):
            value = getattr(value, part)
        shown = row.group(1).strip().strip("`")
        assert shown == ("unset" if value is None else str(value)), (name, shown, value)


def test_make_targets_in_readme_exist():
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    for target in re.findall(r"^make ([a-z-]+)", README, flags=re.M):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target


def test_every_benchmark_script_is_in_the_benchmarks_readme():
    bench = Path(__file__).parents[1] / "benchmarks"
    table = (bench / "README.md").read_text()
    for script in sorted(bench.glob("*.py")):
        assert re.search(rf"^\| `{re.escape(script.name)}` \|", table, flags=re.M), script.name


def test_the_readme_states_the_default_scorer_of_the_code():
    from diffcurate.influence.registry import ScorerSpec

    assert f"`--scorer`, default `{ScorerSpec().signal}`" in README
