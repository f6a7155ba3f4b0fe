"""Errors raised by headscope. Each message names the problem and the fix."""

from __future__ import annotations


class HeadscopeError(Exception):
    """Base class of every error headscope raises on purpose."""


class UnknownDetectorError(HeadscopeError, KeyError):
    """A detector name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class HeadIndexError(HeadscopeError, IndexError):
    """A (layer, head) address outside the model."""


class HeadNotShownError(HeadscopeError, KeyError):
    """A head asked of a result (attention patterns) that does not hold it."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InputError(HeadscopeError, ValueError):
    """Prompts or tokens that cannot be run: empty, too long, bad ids."""


class PromptTooLongError(InputError):
    """A prompt longer than the model's context window."""


class UnsupportedModelError(HeadscopeError, ValueError):
    """A model or file whose architecture headscope cannot hook per head."""


class ModelNotAvailableError(HeadscopeError, RuntimeError):
    """The model needs a download or a package that is not installed."""


class CacheMismatchError(HeadscopeError, RuntimeError):
    """A KV cache that does not hold, or does not give back, what a plain forward computes:
    usually a combination of library versions that headscope's engine cannot handle."""


class EmptyResultError(HeadscopeError, RuntimeError):
    """A detector whose scores carry no information (all NaN, or nothing retrieved)."""


class WeightCacheError(ModelNotAvailableError):
    """A folder of cached float weights that is still damaged after it was rebuilt."""


class SettingError(InputError, TypeError):
    """A detector setting that does not exist, has the wrong type or is out of range (an
    ``InputError``, so a ``ValueError``, and a ``TypeError`` as a bad keyword argument is)."""


class DataError(InputError):
    """A file of the user's own data that cannot be read: the message names the file and line."""


class ArgumentError(HeadscopeError, ValueError):
    """An argument of a public function that cannot work (non-finite, out of range, empty):
    the message names the argument."""


class ScoresMismatchError(ArgumentError):
    """Head scores computed on another model (different shape or model name)."""


class ConfigFileError(InputError):
    """A ``--config`` file that is missing, not JSON, or not ``{detector: {setting: value}}``."""


class OutputFolderError(InputError):
    """An ``--out`` that is a file or cannot be written."""


class ResultFileError(InputError):
    """A saved results file (scores, atlas part) that is missing, cut off or of another kind: the
    message names the file."""


class ResultFileWarning(UserWarning):
    """A saved part or results file that could not be used (cut off, not JSON, the wrong shape):
    the message names the file; headscope moves it aside and computes the result again."""


class ModelFileNotFoundError(ModelNotAvailableError, FileNotFoundError):
    """A model path (a ``.gguf`` file or a folder) that does not exist."""


class CommandLineError(InputError):
    """A command line that argparse cannot read (an unknown flag, a count below 1): one line, exit 2."""


class IdentityMismatchError(ResultFileError):
    """A checkpoint, needle file or atlas part written for another model, other weights (also the
    same model after a weight edit) or other library versions: the message names the fields that
    differ and what to do (another path or folder, or start over)."""


class MissingPartsError(ResultFileError):
    """An atlas folder that lacks parts a run needs: ``--assemble`` (``assemble=True``) before every
    unit was run, or ``--only`` a stage before its detector's scores. The message names each
    missing unit and the ``--only`` run that makes it."""
