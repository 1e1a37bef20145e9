"""`coalora-edge profiles list|show`: the device profiles a model can be resolved for.

Wherever a command takes a profile, it takes a shipped profile's name or a YAML file of
your own; `profiles show FILE` validates such a file and prints what was understood.
"""

from __future__ import annotations

import typer
from rich.table import Table

from coalora_edge.cli.common import console, one_line_errors, print_json
from coalora_edge.profiles import DeviceProfile, load_profile, shipped_profiles
from coalora_edge.units import format_size

profiles_app = typer.Typer(
    help="Device profiles: memory, runtime and formats of the devices a model can ship to.",
    no_args_is_help=True,
)

JSON_HELP = "Print one JSON object instead of a table."


@profiles_app.command("list")
@one_line_errors
def list_profiles(json_out: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """List the shipped device profiles."""
    profiles = shipped_profiles()
    if json_out:
        print_json({"profiles": [p.model_dump(mode="json") for p in profiles]})
        return
    table = Table(title="device profiles")
    for column in ("name", "runtime"):
        table.add_column(column, no_wrap=True)
    for column in ("memory", "reserved", "context", "allowed formats"):
        table.add_column(column)
    for p in profiles:
        table.add_row(
            p.name, p.runtime, format_size(p.memory_bytes), format_size(p.reserved_bytes),
            str(p.context_length), _formats(p),
        )
    console.print(table)
    console.print("[dim]details: coalora-edge profiles show NAME; your own device: a YAML file in the same form[/]")


@profiles_app.command("show")
@one_line_errors
def show_profile(
    name_or_file: str = typer.Argument(..., help="A shipped profile's name or a profile YAML file."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Validate and show one profile (a shipped name or your own YAML file)."""
    profile = load_profile(name_or_file)
    if json_out:
        # The profile's own fields only, so the output is itself a valid profile file.
        print_json(profile.model_dump(mode="json"))
        return
    shown = profile.model_dump()
    shown.update(
        memory_bytes=format_size(profile.memory_bytes),
        reserved_bytes=format_size(profile.reserved_bytes),
        allowed_formats=_formats(profile),
    )
    table = Table("field", "value", title=f"profile {profile.name}", show_header=False)
    for field, value in shown.items():
        table.add_row(field, "-" if value is None else str(value))
    table.add_row("available to the model", format_size(profile.available_bytes))
    console.print(table)


def _formats(profile: DeviceProfile) -> str:
    return ", ".join(profile.allowed_formats) if profile.allowed_formats else f"any {profile.scheme}"
