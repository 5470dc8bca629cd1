"""What every `oel` subcommand shares: the settings, loaded once per invocation."""

from __future__ import annotations

import click

from oel.settings import Settings, SettingsError, load_settings


def settings_of(ctx: click.Context) -> Settings:
    """The settings for this command; a bad value ends it with a message naming the setting."""
    obj = ctx.ensure_object(dict)
    if "settings" not in obj:
        try:
            obj["settings"] = load_settings()
        except SettingsError as exc:
            raise click.ClickException(str(exc)) from None
    return obj["settings"]
