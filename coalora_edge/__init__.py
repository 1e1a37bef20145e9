"""coalora-edge: fine-tune a quantized LLM once (CoA-LoRA), run it on every device."""

from pathlib import Path

__version__ = "0.1.0"

# In a source checkout exporters/ and profiles/ sit beside this folder and import as
# coalora_edge.exporters / coalora_edge.profiles (pyproject.toml's package-dir). An
# installed copy has them inside; a checkout run as `python -m coalora_edge` or by pytest
# resolves them here, from the same checkout, not from whichever one was installed last.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "exporters" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 - a package's own __path__
