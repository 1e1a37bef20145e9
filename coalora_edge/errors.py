"""Typed errors, every one of the package. Library code raises these; only the CLI turns
them into one-line messages, ending with the class's ``exit_code`` (the table is
coalora_edge/cli/common.py's EXIT_CODES, documented in the README)."""


class CoaloraError(Exception):
    """Base class: a problem the user can fix. The message names the problem and the fix."""

    exit_code = 3  # bad input


class SchemeError(CoaloraError):
    """Unknown scheme or format, or a weight shape that no chosen format can hold."""


class ModelError(CoaloraError):
    """A model folder or hub id that cannot be loaded as a supported causal LM."""


class RuntimeLibraryError(CoaloraError):
    """A runtime library (ggml, ONNX Runtime) is missing or does not offer what we need."""

    exit_code = 5


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


class VerificationError(ExportError):
    """An export that its runtime does not compute as trained (KL, top-1, bytes, sizes)."""

    exit_code = 4


class ResourceError(CoaloraError):
    """Not enough memory or disk for the job; says how much is needed and available."""

    exit_code = 6


class OutputExistsError(CoaloraError):
    """The output already exists and the user did not ask to replace it."""


class OutputLocationError(CoaloraError):
    """The output cannot be created where the user asked (a parent is a file, no permission)."""


class InternalError(Exception):
    """A bug: an invariant the code relies on does not hold. Not the user's to fix."""
