"""Deprecated module name, kept for one release: the loss registry lives in :mod:`peft_mtl.data.losses`."""

from __future__ import annotations

import warnings

from ..data.losses import LOSSES, LossFn, get_loss, register_loss  # noqa: F401

warnings.warn("peft_mtl.training.losses is now peft_mtl.data.losses; the old name goes in the next release",
              DeprecationWarning, stacklevel=2)
