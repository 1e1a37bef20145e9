"""Typed errors. Library code raises these; only the CLI turns them into one-line messages."""


class CoaloraError(Exception):
    """Base class: a problem the user can fix. The message names the problem and the fix."""


class SchemeError(CoaloraError):
    """Unknown scheme or format, or a weight shape that no chosen format can hold."""


class ModelError(CoaloraError):
    """A model folder or hub id that cannot be loaded as a supported causal LM."""


class RuntimeLibraryError(CoaloraError):
    """A runtime library (ggml, ONNX Runtime) is missing or does not offer what we need."""


class DataError(CoaloraError):
    """Training or evaluation text that is missing, empty, binary or malformed."""


class BudgetError(CoaloraError):
    """A size budget that no configuration of the allowed formats fits."""


class ProfileError(CoaloraError):
    """A device profile that cannot be found, read or validated, or that a model cannot run under."""


class BundleError(CoaloraError):
    """A bundle that is missing, incomplete, tampered with, or for another base model."""


class ExportError(CoaloraError):
    """An export that cannot be built, or does not compute the trained configuration in its
    runtime; or an exported artifact that is damaged or not one coalora-edge wrote."""
