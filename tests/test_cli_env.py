"""`coalora-edge env`: what a bug report needs, from the installed packages themselves."""

import json

import llama_cpp
import onnxruntime
import torch
from typer.testing import CliRunner

from coalora_edge.cli.commands import app


def test_env_reports_the_installed_versions_and_what_ggml_sees():
    result = CliRunner().invoke(app, ["env", "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert found["packages"]["torch"] == torch.__version__
    assert found["packages"]["llama-cpp-python"] == llama_cpp.__version__
    assert found["packages"]["onnxruntime"] == onnxruntime.__version__
    assert found["onnxruntime"]["providers"] == onnxruntime.get_available_providers()
    assert found["ggml"]["system_info"] == llama_cpp.llama_print_system_info().decode().strip()
    assert found["ggml"]["features"] and all(v in ("0", "1") or v.isdigit() for v in found["ggml"]["features"].values())
    assert found["torch"]["cuda_devices"] == [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    text = CliRunner().invoke(app, ["env"])
    assert text.exit_code == 0 and "llama-cpp-python" in text.stdout and llama_cpp.__version__ in text.stdout
