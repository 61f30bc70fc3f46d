"""The CLI's mitigation help names what the registry and the config hold (one place each)."""

import re
import typing

from diffcurate.cli import run as run_cli
from diffcurate.mitigation import MitigationConfig, mitigation_names


def _help(command, name: str) -> str:
    annotation = typing.get_type_hints(command, include_extras=True)[name]
    (option,) = [m for m in annotation.__metadata__ if hasattr(m, "help")]
    return option.help


def test_help_lists_every_registered_method():
    for command in (run_cli.run_hygiene, run_cli.evaluate):
        text = _help(command, "mitigation")
        assert set(re.findall(r"[a-z]+(?:-[a-z]+)*", text)) >= set(mitigation_names()), text


def test_help_defaults_are_the_configs():
    default = MitigationConfig()
    assert f"measured {default.steps}" in _help(run_cli.run_hygiene, "steps")
    lr = re.search(r"default: ([0-9.e-]+),", _help(run_cli.run_hygiene, "lr")).group(1)
    assert float(lr) == default.lr
    assert default.method == "finetune"


def test_cli_builds_the_config_the_flow_gets():
    options = ["forget-weight=0.5", "warmup_steps=2"]
    given = run_cli.mitigation_config("erasediff", None, 10, None, 50, options, 3, "cpu")
    assert given == MitigationConfig(method="erasediff", steps=10, retrain_steps=50,
                                     forget_weight=0.5, warmup_steps=2, seed=3)  # fmt: skip
    passes = run_cli.mitigation_config(None, 2, None, None, 50, None, 0, "cpu")
    assert passes.steps is None and passes.steps_for(100) == 2 * 2  # 2 epochs x ceil(100/64)
