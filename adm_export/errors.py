"""User-facing errors.

Every subclass of :class:`AdmExportError` is a *user* error: the CLI prints its message on one
line and exits with code 1, without a traceback. Messages quote the bad value and name the flag
or action that fixes it. Bugs stay ordinary exceptions so that they keep their tracebacks.
"""


class AdmExportError(Exception):
    """Base class of errors caused by user input or the user's environment."""

    exit_code = 1


class ModelNotFoundError(AdmExportError):
    """The model id is neither an embedded name, a local folder, nor reachable on the hub."""


class ManifestMismatchError(AdmExportError):
    """An artifact was made from another model, config or format version than the one asked for."""


class ArtifactNotFoundError(AdmExportError):
    """A stage's input artifact is missing or incomplete."""


class OutputExistsError(AdmExportError):
    """The output folder is not empty and ``--force`` was not given."""


class OutputLockedError(AdmExportError):
    """Another process is writing the same output folder (its lock file is held)."""


class OutOfMemoryError(AdmExportError):
    """A stage ran out of memory; the message names the options to lower."""


class InvalidInputError(AdmExportError):
    """A value given by the user is out of range or malformed."""


class MissingDependencyError(AdmExportError):
    """An optional package is not installed; the message names the pip extra that brings it."""


def require(module: str, extra: str, purpose: str):
    """Import an optional module or raise :class:`MissingDependencyError` naming the extra.

    Args:
        module: Importable module name, e.g. ``"tensorrt_rtx"``.
        extra: The pip extra of this package that installs it, e.g. ``"tensorrt-rtx"``.
        purpose: What the module is needed for, for the message.

    Returns:
        The imported module.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"{purpose} needs the Python module '{module}', which is not installed ({exc}); "
            f"install it with: pip install 'adm-export[{extra}]'"
        ) from exc
