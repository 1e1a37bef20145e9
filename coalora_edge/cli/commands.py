"""The `coalora-edge` command line: one module per subcommand, registered here."""

from __future__ import annotations

import typer

from coalora_edge.cli.common import OneLineUsageErrors
from coalora_edge.cli.demo import demo
from coalora_edge.cli.env import env
from coalora_edge.cli.eval import eval
from coalora_edge.cli.export import export
from coalora_edge.cli.inspect import inspect
from coalora_edge.cli.pareto import pareto
from coalora_edge.cli.profiles import profiles_app
from coalora_edge.cli.resolve import resolve
from coalora_edge.cli.run import run
from coalora_edge.cli.train import train

app = typer.Typer(
    name="coalora-edge",
    cls=OneLineUsageErrors,
    help="Fine-tune a quantized LLM once, run it on every device (CoA-LoRA -> llama.cpp / ONNX Runtime).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _group() -> None:
    """Fine-tune a quantized LLM once, run it on every device."""


app.command()(inspect)
app.command()(train)
app.command()(eval)
app.command()(pareto)
app.add_typer(profiles_app, name="profiles")
app.command()(resolve)
app.command()(export)
app.command()(run)
app.command()(demo)
app.command()(env)
