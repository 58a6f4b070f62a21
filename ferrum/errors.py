"""The one exception hierarchy of Ferrum.

Every error a user can trigger derives from :class:`FerrumError`, so callers can
catch one type. Messages say what was wrong and what to do about it.
"""

from __future__ import annotations


class FerrumError(Exception):
    """Base class of every error Ferrum raises on purpose."""


class ConfigError(FerrumError):
    """A model ``config.json`` is missing, malformed or describes an unsupported model."""


class CheckpointError(FerrumError):
    """Weights are missing, misnamed or of the wrong shape."""


class MissingTensorError(CheckpointError):
    """A tensor the architecture needs is not in the checkpoint."""

    def __init__(self, names: list[str], where: str, advice: str | None = None):
        self.names, self.where = list(names), where
        shown = ", ".join(self.names[:8]) + (" ..." if len(self.names) > 8 else "")
        super().__init__(
            f"checkpoint {where} lacks {len(self.names)} tensor(s) the model needs: {shown}. " + (advice or
            "Check that the folder holds every shard listed in model.safetensors.index.json "
            "and that config.json matches the weights.")
        )


class BackendError(FerrumError):
    """A backend plugin could not be found, loaded or used."""


class BackendUnavailableError(BackendError):
    """The requested backend is installed but cannot run on this machine."""


class PluginContractError(BackendError):
    """A plugin breaks the hookspec contract (missing required op, bad result)."""


class UnsupportedFeatureError(FerrumError):
    """The model needs something the active backend does not offer."""


class InvalidRequestError(FerrumError, ValueError):
    """Bad input from the caller; nothing was changed. ``param`` names the argument at fault, where one is
    (``prompt``, a :class:`~ferrum.sampling.SamplingParams` field), so a server can name its own field."""

    def __init__(self, message: str = "", param: str | None = None):
        super().__init__(message)
        self.param = param


class ChatTemplateError(InvalidRequestError):
    """A chat template refused the messages (its ``raise_exception``) or failed on them (a value it cannot read)."""


class UnknownSequenceError(InvalidRequestError, KeyError):
    """A cache / sequence id that the model does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PositionMismatchError(InvalidRequestError):
    """A token's position does not follow the sequence's cached length."""


class ContextLengthExceededError(InvalidRequestError):
    """A sequence would grow past the model's context length."""


class AdapterError(FerrumError):
    """A LoRA adapter is malformed, uses a feature Ferrum does not run, does not fit the base model,
    or cannot be loaded or unloaded now (memory budget, requests still using it)."""


class KVCacheExhaustedError(FerrumError):
    """Not enough free KV blocks for a request; other sequences are untouched."""


class RequestFailedError(FerrumError):
    """Something failed while one request ran (an op, sampling, detokenizing, its output callback).

    Only that request (or that step's batch, for a failed forward pass) ended;
    the engine serves the others. The original exception is ``__cause__``.
    """


class ExecutorStateError(FerrumError):
    """The executor was used after shutdown or before it was ready."""
