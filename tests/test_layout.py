"""The tree shows the pipeline: no module imports from a later stage, no file grows past
what one sitting reads, and the wheel ships the design card's top level."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Folders of the repository that import as coalora_edge.<name>.
PACKAGE_DIRS = {"coalora_edge": ROOT / "coalora_edge", "coalora_edge.exporters": ROOT / "exporters",
                "coalora_edge.profiles": ROOT / "profiles"}
#: The data flow, in order: a module may import its own stage and earlier ones only.
STAGES = [
    ("coalora_edge", "coalora_edge.errors", "coalora_edge.fileio", "coalora_edge.units", "coalora_edge.resources"),
    ("coalora_edge.model",),
    ("coalora_edge.schemes",),
    ("coalora_edge.adapter",),
    ("coalora_edge.search",),
    ("coalora_edge.training",),
    ("coalora_edge.bundle",),
    ("coalora_edge.runtimes", "coalora_edge.profiles", "coalora_edge.resolve"),
    ("coalora_edge.exporters",),
    ("coalora_edge.demo",),
    ("coalora_edge.cli", "coalora_edge.__main__"),
]
MAX_LINES = 400


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            if package == "coalora_edge" and parts[0] in ("exporters", "profiles"):
                continue
            found[name] = path
    return found


def stage(module: str) -> int:
    best = max(((i, prefix) for i, names in enumerate(STAGES) for prefix in names
                if module == prefix or module.startswith(prefix + ".")), key=lambda ip: len(ip[1]))
    return best[0]


def imports(path: Path, module: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from pkg import module`
    known = modules()
    return {name for name in found if name in known}


def test_no_module_imports_a_later_stage():
    later = [f"{module} (stage {stage(module)}) imports {target} (stage {stage(target)})"
             for module, path in modules().items() for target in imports(path, module)
             if stage(target) > stage(module)]
    assert later == []


def test_every_module_has_a_stage():
    for module in modules():
        stage(module)  # raises on a module outside every stage


def test_no_python_file_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in [*modules().values(), *ROOT.glob("bench/*.py")]
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


@pytest.mark.slow
def test_wheel_ships_exporters_and_profiles(tmp_path):
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    source = shutil.copytree(ROOT, tmp_path / "source", ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "results"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(source)], check=True)
    (wheel,) = tmp_path.glob("coalora_edge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "coalora_edge/exporters/gguf/export.py" in names
    assert "coalora_edge/exporters/onnx/export.py" in names
    assert "coalora_edge/profiles/raspberry-pi-5-8gb.yaml" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True)
    probe = ("import coalora_edge.exporters.gguf.export, coalora_edge.exporters.onnx.export;"
             "from coalora_edge.profiles import load_profile, shipped_names;"
             "import coalora_edge, coalora_edge.exporters as e;"
             "print(coalora_edge.__file__, e.__file__, len(shipped_names()), load_profile('raspberry-pi-5-8gb').runtime)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": ""},
                         capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in out[:2]), out
    assert int(out[2]) >= 10 and out[3] == "llama.cpp"
