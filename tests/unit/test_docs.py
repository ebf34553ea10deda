"""The README documents every setting and every CLI command."""

from __future__ import annotations

from pathlib import Path

import click

from app.config import ClientSettings, Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_configuration_reference() -> None:
    for model in (Settings, ClientSettings):
        for field in model.model_fields.values():
            alias = field.validation_alias
            names = (
                [alias]
                if isinstance(alias, str)
                else [
                    c for c in getattr(alias, "choices", []) if isinstance(c, str) and c.isupper()
                ]
            )
            for name in names:
                assert f"`{name}`" in README, f"{name} is not documented in README.md"


def _commands(group: click.Group, prefix: str) -> list[str]:
    out = []
    for name, cmd in group.commands.items():
        full = f"{prefix} {name}"
        if isinstance(cmd, click.Group):
            out += _commands(cmd, full)
        else:
            out.append(full)
    return out


def test_every_cli_command_is_in_the_readme() -> None:
    from app.cli.main import cli

    assert isinstance(cli, click.Group)
    for command in _commands(cli, "spell"):
        assert f"`{command}" in README, f"{command} is not documented in README.md"
