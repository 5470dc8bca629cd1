"""``oel model``: prepare and inspect the model every service uses."""

from __future__ import annotations

import json

import click

from oel.settings import Settings, SettingsError, load_settings


def _settings(ctx: click.Context) -> Settings:
    obj = ctx.ensure_object(dict)
    if "settings" not in obj:
        try:
            obj["settings"] = load_settings()
        except SettingsError as exc:
            raise click.ClickException(str(exc)) from None
    return obj["settings"]


@click.group("model")
def model() -> None:
    """The base model: the bundled SmolLM2-135M-Instruct (converted once from its GGUF) or OEL_MODEL__PATH."""


@model.command("prepare")
@click.option("--force", is_flag=True, help="Convert again even if the folder exists.")
@click.pass_context
def model_prepare(ctx: click.Context, force: bool) -> None:
    """Convert the bundled GGUF into a bfloat16 Hugging Face folder under the cache dir (once; idempotent)."""
    from oel.model.prepare import ModelPrepareError, model_hash, prepare_default_model

    s = _settings(ctx)
    if s.model.path is not None and not force:
        click.echo(f"OEL_MODEL__PATH is set: using {s.model.path}; nothing to prepare (the default model is only used when it is unset)")
        return
    try:
        path, seconds = prepare_default_model(s, force=force)
    except ModelPrepareError as exc:
        raise click.ClickException(str(exc)) from None
    if seconds:
        click.echo(f"converted the default model into {path} in {seconds:.1f} s")
    else:
        click.echo(f"default model already prepared at {path}")
    click.echo(f"hash {model_hash(path)}")


@model.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def model_info(ctx: click.Context, as_json: bool) -> None:
    """Show which model folder is used, its architecture, size and hash (preparing the default model if needed)."""
    from oel.model.prepare import ModelPrepareError, model_hash, resolve_model_path

    s = _settings(ctx)
    try:
        path = resolve_model_path(s)
    except ModelPrepareError as exc:
        raise click.ClickException(str(exc)) from None
    config = json.loads((path / "config.json").read_text())
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    info = {
        "path": str(path),
        "default": s.model.path is None,
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "hidden_size": config.get("hidden_size"),
        "num_hidden_layers": config.get("num_hidden_layers"),
        "vocab_size": config.get("vocab_size"),
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "size_mb": round(size / 1e6, 1),
        "hash": model_hash(path),
        "backend": s.model.backend,
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            click.echo(f"{key:18s} {value}")
