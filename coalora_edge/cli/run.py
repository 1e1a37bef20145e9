"""`coalora-edge run ARTIFACT --prompt TEXT [--max-tokens N]`: greedy generation with an
exported artifact in its own runtime (a sidecar adapter beside the model is applied),
printed as it is generated."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from coalora_edge.cli.common import console, one_line_errors, print_json
from coalora_edge.errors import CoaloraError
from coalora_edge.runtimes import RUNTIMES, for_artifact

#: ggml's GGML_MAX_N_THREADS: llama.cpp aborts (std::bad_alloc) on more, e.g. --threads 100000
MAX_THREADS = 512


@one_line_errors
def run(
    artifact: Path = typer.Argument(..., help="A model file (.gguf, ...) or the folder `coalora-edge export` wrote."),
    prompt: str = typer.Option(..., "--prompt", help="Text to continue."),
    max_tokens: int = typer.Option(64, min=1, help="Tokens to generate at most (stops earlier at end of text)."),
    threads: Optional[int] = typer.Option(None, min=1, max=MAX_THREADS, help="CPU threads (default: the runtime's)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object {artifact, prompt, text}."),
) -> None:
    """Generate text with an exported model in its runtime."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes on the command line arrive as lone surrogates
        raise CoaloraError("the prompt is not valid UTF-8; pass UTF-8 text") from None
    model = _model_file(artifact)
    pieces = for_artifact(model.suffix).hook("stream")(model, prompt, max_tokens, threads)
    if json_out:
        print_json({"artifact": str(model), "prompt": prompt, "text": "".join(pieces)})
        return
    console.print(prompt, style="bold", end="", highlight=False, markup=False, soft_wrap=True)
    for piece in pieces:  # as the runtime generates them
        console.print(piece, end="", highlight=False, markup=False, soft_wrap=True)
    console.print()


def _model_file(path: Path) -> Path:
    """The model file of ``path``: itself, or ``model.<suffix>`` inside an export folder."""
    artifacts = [r.artifact for r in RUNTIMES.values() if r.artifact and r.stream]
    if path.is_dir():
        found = [path / name for name in artifacts if (path / name).is_file()]
        if len(found) != 1:
            raise CoaloraError(f"{path} holds no single model file ({', '.join(artifacts)}); "
                               "pass the folder `coalora-edge export` wrote or a model file")
        return found[0]
    if not path.is_file():
        raise CoaloraError(f"{path} not found; pass a model file or the folder `coalora-edge export` wrote")
    if for_artifact(path.suffix) is None:
        raise CoaloraError(f"cannot run {path}: known model files are {', '.join(Path(a).suffix for a in artifacts)}")
    return path
