"""The trained artifact: a folder that later commands read, verified on every load.

    BUNDLE/
      manifest.json        format version, base-model fingerprint, scheme, matrices,
                           adapter settings, training summary, sha256 of every file below
      adapter.safetensors  LoRA factors and configuration model (per-config: one set per
                           configuration, keys prefixed "cfg{i}.")
      configs.json         the training configuration set, and every configuration evaluated
                           ("evaluated", training set first; pareto.json indexes it);
                           choice lists in matrix order
      imatrix.safetensors  importance matrix (gguf), sensitivity.json, pareto.json, ...:
                           written through :func:`write_bundle`'s ``extra_files``

Written atomically (temporary folder, then rename). Only safetensors and JSON: nothing
in a bundle is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file

from coalora_edge import __version__
from coalora_edge.bundle.schema import (
    Manifest, check_imatrix, check_listing, check_manifest, check_pareto, check_safetensors, check_sensitivity,
)
from coalora_edge.errors import BundleError
from coalora_edge.fileio import atomic_dir, sha256_file
from coalora_edge.model.matrices import Matrix
from coalora_edge.training.job import TrainJob, Trained, train

BUNDLE_FORMAT = "coalora-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ADAPTER = "adapter.safetensors"
CONFIGS = "configs.json"
IMATRIX = "imatrix.safetensors"  # llama.cpp importance matrix the gguf formats were quantized with
SENSITIVITY = "sensitivity.json"  # cost per (matrix, format), for budgets the set lacks
PARETO = "pareto.json"  # every evaluated configuration: bytes, bits per weight, validation loss
#: weight files whose bytes make up a base model's fingerprint
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


def model_fingerprint(model_dir: Path) -> dict[str, Any]:
    """sha256 of every weight file, and one sha256 over them all (order-independent)."""
    files = sorted(p for pattern in WEIGHT_PATTERNS for p in Path(model_dir).glob(pattern))
    per_file = {p.name: sha256_file(p) for p in files}
    combined = hashlib.sha256("\n".join(f"{n} {d}" for n, d in per_file.items()).encode()).hexdigest()
    return {"sha256": combined, "files": per_file}


@dataclass
class Bundle:
    path: Path
    manifest: Manifest

    @property
    def matrices(self) -> list[Matrix]:
        return [Matrix(m.name, m.layer, m.module, (m.shape[0], m.shape[1])) for m in self.manifest.matrices]

    @property
    def scheme(self) -> str:
        return self.manifest.scheme

    @property
    def choices(self) -> list[str]:
        return self.manifest.choices

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return self._tensors(ADAPTER)

    def imatrix(self) -> dict[str, torch.Tensor]:
        """The importance matrix the gguf formats were quantized with, checked before ggml sees it."""
        values = self._tensors(IMATRIX)
        check_imatrix(values, self.manifest, f"{self.path}/{IMATRIX}")
        return values

    def _tensors(self, name: str) -> dict[str, torch.Tensor]:
        try:
            return load_file(self._vouched(name))
        except (SafetensorError, OSError) as e:
            raise BundleError(f"{self.path}/{name} cannot be read ({str(e).splitlines()[0]}); retrain or restore "
                              "the bundle") from None

    def configs(self) -> list[dict[str, str]]:
        """The training configuration set, as matrix name -> format name."""
        return self._configs("training_set")

    def evaluated(self) -> list[dict[str, str]]:
        """Every configuration measured (the training set first): what ``pareto.json``'s
        ``config`` fields index. Bundles from before the search list only the training set."""
        return self._configs("training_set" if self.read_json(CONFIGS).get("evaluated") is None else "evaluated")

    def _configs(self, key: str) -> list[dict[str, str]]:
        names = [m.name for m in self.manifest.matrices]
        return [dict(zip(names, choices)) for choices in self.read_json(CONFIGS)[key]]

    def read_json(self, name: str) -> Any:
        self._vouched(name)
        return _read_json(self.path, name)

    def _vouched(self, name: str) -> Path:
        """Only files the manifest vouches for (by sha256) are read."""
        if name not in self.manifest.files:
            raise BundleError(f"bundle {self.path} has no {name}; it was written by an older coalora-edge or is "
                              "incomplete: retrain it")
        return self.path / name

    def check_base_model(self, model_dir: Path) -> None:
        """Refuse a base model whose weights differ from the one the adapter was trained on."""
        expected = self.manifest.base_model.sha256
        actual = model_fingerprint(model_dir)["sha256"]
        if actual != expected:
            raise BundleError(
                f"{model_dir} is not the base model of bundle {self.path} (weights sha256 {actual[:12]}... "
                f"!= {expected[:12]}...); pass the model it was trained on ({self.manifest.base_model.source})"
            )


def write_bundle(
    out: Path,
    *,
    base_model: Mapping[str, Any],
    scheme: str,
    choices: list[str],
    matrices: list[Matrix],
    adapter: Mapping[str, Any],
    adapter_state: Mapping[str, torch.Tensor],
    training_set: list[Mapping[str, str]],
    training: Mapping[str, Any],
    extra_files: Mapping[str, bytes] | None = None,
    force: bool = False,
    evaluated: list[Mapping[str, str]] | None = None,
) -> Bundle:
    """Write a bundle atomically; ``base_model`` holds ``source`` plus :func:`model_fingerprint`.

    ``evaluated`` (every configuration measured) must begin with ``training_set``.
    """
    names = [m.name for m in matrices]

    def rows(configs: list[Mapping[str, str]]) -> list[list[str]]:
        return [[c[n] for n in names] for c in configs]

    listing = {"matrices": names, "training_set": rows(training_set)}
    if evaluated is not None:
        if rows(evaluated[: len(training_set)]) != listing["training_set"]:
            raise BundleError("the evaluated configurations must begin with the training set")
        listing["evaluated"] = rows(evaluated)
    with atomic_dir(out, force=force) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in adapter_state.items()}, tmp / ADAPTER)
        (tmp / CONFIGS).write_text(json.dumps(listing))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": FORMAT_VERSION,
            "created_by": f"coalora-edge {__version__}",
            "base_model": dict(base_model),
            "scheme": scheme,
            "choices": list(choices),
            "matrices": [{"name": m.name, "layer": m.layer, "module": m.module, "shape": list(m.shape)} for m in matrices],
            "adapter": dict(adapter),
            "training": dict(training),
            "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir())},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Bundle(Path(out), Manifest.model_validate(manifest))


def write_trained(out: Path, trained: Trained, force: bool = False) -> Bundle:
    """The bundle of a training run: its adapter, configurations, search results and importance matrix."""
    extra = {
        SENSITIVITY: json.dumps(trained.sensitivity).encode(),
        PARETO: json.dumps(trained.pareto, indent=2).encode(),
    }
    if trained.imatrix.values:
        extra[IMATRIX] = save(trained.imatrix.values, metadata={"tokens": json.dumps(trained.imatrix.tokens)})
    return write_bundle(
        out, base_model={**trained.base_model, **model_fingerprint(trained.model_dir)}, scheme=trained.scheme,
        choices=trained.choices, matrices=trained.matrices, adapter=trained.adapter, adapter_state=trained.adapter_state,
        training_set=trained.training_set, evaluated=trained.evaluated, training=trained.training, extra_files=extra,
        force=force,
    )


def train_bundle(job: TrainJob) -> Bundle | None:
    """`coalora-edge train`: train, write the bundle, then drop the checkpoint (a failed write keeps it).
    None in the other processes of a multi-process run."""
    trained = train(job)
    if trained is None:
        return None
    bundle = write_trained(job.out, trained, force=job.force)
    shutil.rmtree(job.checkpoint_dir, ignore_errors=True)
    return bundle


def load_bundle(path: Path) -> Bundle:
    """Read and verify a bundle: format, version, and the sha256 of every listed file."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise BundleError(f"{path} is not a coalora-edge bundle (no {MANIFEST}); pass the folder `train --out` wrote")
    manifest = _read_json(path, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}/{MANIFEST} is not a coalora-edge bundle manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"bundle {path} has format version {version}, this coalora-edge reads {FORMAT_VERSION}; "
            "use the coalora-edge version that wrote it or retrain"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or ADAPTER not in files:
        raise BundleError(f"{path}/{MANIFEST} lists no files; the bundle is incomplete")
    for name, digest in files.items():
        # Names are plain file names, and no file is a link: nothing read lies outside the folder.
        file = path / name if isinstance(name, str) else None
        if file is None or Path(name).name != name or name in ("", ".", "..") or file.is_symlink():
            raise BundleError(f"{path}/{MANIFEST} names an invalid file {name!r}; the bundle was tampered with")
        if not file.is_file():
            raise BundleError(f"bundle {path} is missing {name}; restore it or retrain")
        if sha256_file(file) != digest:
            raise BundleError(f"bundle {path}: {name} does not match its sha256 in {MANIFEST} (corrupted or edited)")
    return Bundle(path, check_contents(path, manifest))


def check_contents(path: Path, raw: dict[str, Any]) -> Manifest:
    """What the files hold, beyond their hashes: the manifest can be rewritten with them."""
    manifest = check_manifest(raw, f"{path}/{MANIFEST}")
    for name in manifest.files:
        if name.endswith(".safetensors"):
            check_safetensors(path / name)
    if CONFIGS not in manifest.files:
        raise BundleError(f"{path}/{MANIFEST} lists no {CONFIGS}; the bundle is incomplete")
    evaluated = check_listing(_read_json(path, CONFIGS), manifest, f"{path}/{CONFIGS}")
    if PARETO in manifest.files:
        check_pareto(_read_json(path, PARETO), evaluated, manifest, f"{path}/{PARETO}")
    if SENSITIVITY in manifest.files:
        check_sensitivity(_read_json(path, SENSITIVITY), manifest, f"{path}/{SENSITIVITY}")
    return manifest


def _read_json(path: Path, name: str) -> Any:
    try:
        return json.loads((path / name).read_text())
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, nesting too deep, a number too long
        raise BundleError(f"{path}/{name} is corrupt ({type(e).__name__}); retrain or restore the bundle") from None
