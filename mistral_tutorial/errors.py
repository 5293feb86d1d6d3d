"""The library's own errors, in a module of their own so that every other module can import them (STYLE §10).

    MistralTutorialError (ValueError)
    ├── ConfigError                 a ModelConfig field holds a value the model cannot be built with
    ├── CheckpointError             a checkpoint cannot be loaded exactly: a bad file, tensor or config
    └── CheckpointConfigError       a checkpoint's config (config.json, params.json, a transformers config) asks for
                                    something this library does not implement, or is malformed: both of the above

All are ValueErrors, so `except ValueError` keeps working; the CLI prints any of them as one line.
One warning: AssumedDefaultWarning, a checkpoint's config left out a field whose value the references do not agree on
(or do not state), and the library says which value it took and why.
"""

from __future__ import annotations


class MistralTutorialError(ValueError):
    """Base of the library's errors: something given to the library is wrong, and the message says what and how to fix
    it."""


class ConfigError(MistralTutorialError):
    """A ModelConfig field holds a value the model cannot be built with."""


class CheckpointError(MistralTutorialError):
    """A checkpoint does not fit the model: a missing, unexpected or mis-shaped tensor, a broken file, an unknown
    format, or a config field the model does not implement."""


class CheckpointConfigError(CheckpointError, ConfigError):
    """A checkpoint's config cannot be turned into a ModelConfig exactly: a missing or mistyped key, or a field whose
    value asks for something the model does not implement (a rope scaling, an activation, biases, ...).

    Both a CheckpointError and a ConfigError: `except mt.CheckpointError` and `except mt.ConfigError` each catch it.
    """


class AssumedDefaultWarning(UserWarning):
    """A checkpoint's config leaves out a field, and the value this library assumed for it is not the only one the
    references would give (a params.json without `rope_theta`: 1e4 here and in Mistral-7B-v0.1, 1e6 in
    mistral-inference). The message names each field, the value taken and why; setting the field silences it."""
