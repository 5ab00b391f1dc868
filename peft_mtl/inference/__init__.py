"""Inference: loaded backbones with adapter sets, evaluation, metrics, ensembles, export, int8."""
