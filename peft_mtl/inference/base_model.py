"""Deprecated module name, kept for one release: the adapter host lives in :mod:`peft_mtl.inference.adapter_host`."""

from __future__ import annotations

import warnings

from .adapter_host import SEP, AdapterHost, AdapterSet, format_predictions, load_adapters, load_base  # noqa: F401

BaseModel = AdapterHost  # the old name of AdapterHost

warnings.warn("peft_mtl.inference.base_model is now peft_mtl.inference.adapter_host (BaseModel is AdapterHost); "
              "the old names go in the next release", DeprecationWarning, stacklevel=2)
