"""Losses and metrics behave as their formulas say."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from peft_mtl.data.losses import LOSSES, get_loss, register_loss
from peft_mtl.data.metrics import accuracy, overall_score, pearson


def test_dual_objective_is_one_vs_all_bce():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    labels = torch.tensor([0])
    expected = -(math.log(torch.sigmoid(torch.tensor(2.0))) + math.log(1 - torch.sigmoid(torch.tensor(-1.0)))
                 + math.log(1 - torch.sigmoid(torch.tensor(0.5))))
    assert get_loss("dual")(logits, labels).item() == pytest.approx(expected, rel=1e-5)


def test_ordinal_loss_punishes_far_mistakes_more():
    labels = torch.tensor([0])
    near = torch.log(torch.tensor([[0.5, 0.5, 1e-6, 1e-6, 1e-6]]))
    far = torch.log(torch.tensor([[0.5, 1e-6, 1e-6, 1e-6, 0.5]]))
    oll = get_loss("ordinal")
    assert oll(far, labels).item() > oll(near, labels).item() > 0
    perfect = torch.tensor([[30.0, 0, 0, 0, 0]])
    assert oll(perfect, labels).item() == pytest.approx(0, abs=1e-4)


def test_loss_registry_rejects_duplicates_and_lists_names():
    with pytest.raises(ValueError):
        register_loss("mse")(lambda *a, **k: None)
    with pytest.raises(KeyError, match="known losses"):
        get_loss("nope")
    assert {"cross_entropy", "dual", "ordinal", "mse"} <= set(LOSSES)


def test_metrics_and_overall_score():
    assert accuracy(np.array([1, 2, 3]), np.array([1, 0, 3])) == pytest.approx(2 / 3)
    assert pearson(np.array([1.0, 2, 3]), np.array([2.0, 4, 6.5])) == pytest.approx(0.9986, abs=1e-3)
    assert pearson(np.array([1.0, 1, 1]), np.array([1.0, 2, 3])) == 0.0
    m = {"sst": {"accuracy": 0.5}, "qqp": {"accuracy": 0.8}, "sts": {"pearson": 0.6}}
    assert overall_score(m) == pytest.approx((0.5 + 0.8 + 0.8) / 3)
    assert overall_score({"sst": {"accuracy": 0.5}}) is None
