"""Errors that reach the user as one readable message (the CLI prints them without a traceback)."""
import importlib


class DexmlError(Exception):
    """Base class: a problem with the user's input, params or environment."""


class ConfigError(DexmlError):
    """Bad or missing params."""


class DataError(DexmlError):
    """A dataset file is missing, malformed or fails validation."""


class BundleError(DexmlError):
    """A deployable bundle is incomplete or has been tampered with."""


class MissingDependency(DexmlError, ImportError):
    """An optional package is not installed (the CPU and GPU builds of faiss and onnxruntime are
    separate extras: pip extras can only add packages, never swap one build for the other)."""


def require_optional(module: str):
    """`import module` for faiss / onnxruntime, or MissingDependency naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise MissingDependency(
            f"{top} is not installed: pip install 'dexml[cpu]' (faiss-cpu, onnxruntime) or, on a GPU "
            f"machine, 'dexml[gpu]' (faiss-gpu, onnxruntime-gpu); never both") from None


class InputError(DexmlError, ValueError):
    """A request that cannot be answered as asked: a k out of range, a text that is not valid
    Unicode. A ValueError too, so library callers can catch it as one."""


class TransientError(DataError):
    """A dataset source that could not be reached (network failure after the retries, a path
    not there yet): trying again later may succeed. `dexml download` exits with EXIT_TRANSIENT."""


# Exit statuses of the `dexml` command (README "Exit status").
EXIT_ERROR = 1  # a DexmlError: bad input, params or environment (the message says which)
EXIT_USAGE = 2  # bad command-line arguments (argparse)
EXIT_NOT_PROMOTED = 3  # `dexml promote`: the gate said no; production unchanged
EXIT_TRANSIENT = 75  # a TransientError (EX_TEMPFAIL in sysexits.h): retrying may succeed
