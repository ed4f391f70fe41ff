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
