"""Typed errors. Each message names the problem and the fix; the CLI prints it on one line."""


class DreamLLMError(Exception):
    """Base class of every error this package raises on purpose."""


class CheckpointError(DreamLLMError):
    """A checkpoint file is missing, truncated, corrupt, or does not match the config."""


class InvalidInputError(DreamLLMError, ValueError):
    """A request argument is out of range or of the wrong shape or type."""


class ContextOverflowError(InvalidInputError):
    """The prompt (plus images and requested tokens) does not fit the model's context."""


class ImageLoadError(InvalidInputError):
    """An input image cannot be opened or decoded."""


class EngineBusyError(DreamLLMError, RuntimeError):
    """A second call arrived while the engine was serving one; engines serve one call at a time."""
