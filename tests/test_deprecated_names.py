"""Names that moved in the redesign keep working for one release, each with a DeprecationWarning."""

from __future__ import annotations

import importlib

import pytest


def test_base_model_is_the_adapter_host_under_its_old_name():
    import peft_mtl
    from peft_mtl.inference.adapter_host import AdapterHost

    with pytest.warns(DeprecationWarning, match="AdapterHost"):
        assert peft_mtl.BaseModel is AdapterHost
    with pytest.warns(DeprecationWarning, match="adapter_host"):
        old = importlib.reload(importlib.import_module("peft_mtl.inference.base_model"))
    assert old.BaseModel is AdapterHost and old.load_base is peft_mtl.load_base


@pytest.mark.parametrize("old, new, name", [
    ("peft_mtl.training.losses", "peft_mtl.data.losses", "register_loss"),
    ("peft_mtl.inference.metrics", "peft_mtl.data.metrics", "register_metric"),
])
def test_moved_registries_answer_under_their_old_module(old, new, name):
    with pytest.warns(DeprecationWarning, match=new):
        module = importlib.reload(importlib.import_module(old))
    assert getattr(module, name) is getattr(importlib.import_module(new), name)
