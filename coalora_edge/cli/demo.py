"""`coalora-edge demo [--quick] [--out DIR] [--model M] [--data FILE]...`: the whole story
(pretrain or load a base model, train, search, resolve, export, run) on nothing but
Python's own files; see coalora_edge/demo/pipeline.py."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from coalora_edge.cli.common import console, one_line_errors
from coalora_edge.demo.pipeline import DEFAULT_PROMPT, PLANS, demo as make_demo
from coalora_edge.demo.report import summary_lines


@one_line_errors
def demo(
    out: Path = typer.Option(Path("coalora-demo"), help="Folder to write: bundles, Pareto plots, profiles, exports, report.md."),
    quick: bool = typer.Option(False, help="A ~2-minute version (smaller model, few steps): checks the whole path, not the quality."),
    model: Optional[str] = typer.Option(None, help="Your own base model folder instead of the demo's pretrained one."),
    data: List[str] = typer.Option([], help="Your own text (.txt/.jsonl) instead of the standard library's docstrings; repeatable."),
    prompt: str = typer.Option(DEFAULT_PROMPT, help="Prompt for the generated samples."),
    cache: Optional[Path] = typer.Option(None, help="Where the pretrained demo model is kept (default: $COALORA_CACHE/demo)."),
    force: bool = typer.Option(False, help="Replace OUT if it exists (only once the new demo has finished)."),
) -> None:
    """Train once, ship to five devices, run in llama.cpp and ONNX Runtime: nothing downloaded."""
    steps = iter(range(1, 10))
    report = make_demo(PLANS["quick" if quick else "full"], out, model=model, data=data, prompt=prompt, cache=cache,
                      force=force, progress=lambda phase: console.rule(f"[bold][{next(steps)}/4] {phase}"))
    console.rule(f"[bold]one training per runtime, {len(report['devices'])} devices")
    for line in summary_lines(report):
        console.print(line, highlight=False)
    console.print(f"{report['seconds']['total'] / 60:.1f} minutes; report: {out / 'report.md'}", highlight=False)
