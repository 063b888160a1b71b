"""Lars against independent references over 50 steps (apex LARC + torch SGD transcribed, optax.lars)."""

from __future__ import annotations

import optax
import pytest
import torch
from optim_problem import GradientField, assert_close, relative_errors, run_torch, torch_groups
from optim_references import DECAY_MASK, apex_larc_sgd, run_optax
from optim_registry import INFOS, settings_of

from legw_hf import Lars

FIELD = GradientField()


def lars_run(lr: float, decay: float = 0.01, no_decay_extra: dict | None = None, **kwargs):
    return run_torch(lambda p: Lars(torch_groups(p, decay, **(no_decay_extra or {})), lr=lr, **kwargs), FIELD)


@pytest.mark.parametrize("nesterov", [False, True])
def test_larc_preset_matches_apex_larc_over_torch_sgd(nesterov):
    result, optimizer = lars_run(0.005, preset="larc", momentum=0.9, nesterov=nesterov)
    assert_close(
        result,
        apex_larc_sgd(FIELD, lr=0.005, decay=0.01, momentum=0.9, trust_coefficient=0.02, clip=True, nesterov=nesterov),
    )
    ratios = optimizer.trust_stats[:, 2]
    assert (ratios[:3] == 1).any() and (ratios[:3] < 1).any()  # both sides of the LR cap were exercised


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_larc_scale_preset_matches_apex_larc_without_clip(momentum):
    result, _ = lars_run(0.5, preset="larc_scale", momentum=momentum)
    assert_close(
        result, apex_larc_sgd(FIELD, lr=0.5, decay=0.01, momentum=momentum, trust_coefficient=0.001, clip=False)
    )


@pytest.mark.parametrize("nesterov", [False, True])
def test_optax_preset_matches_optax_lars(nesterov):
    result, _ = lars_run(0.5, preset="optax", nesterov=nesterov)
    reference = run_optax(
        optax.lars(
            0.5,
            weight_decay=0.01,
            weight_decay_mask=DECAY_MASK,
            trust_coefficient=0.001,
            eps=0.0,
            momentum=0.9,
            nesterov=nesterov,
        ),
        FIELD,
    )
    assert_close(result, reference)


def test_optax_trust_ratio_mask_is_the_adapt_rule():
    result, _ = lars_run(0.5, preset="optax", adapt="decayed")
    reference = run_optax(
        optax.lars(0.5, weight_decay=0.01, weight_decay_mask=DECAY_MASK, trust_ratio_mask=DECAY_MASK), FIELD
    )
    assert_close(result, reference)


def test_the_references_really_differ():
    larc = apex_larc_sgd(FIELD, lr=0.5, decay=0.01, momentum=0.9, trust_coefficient=0.001, clip=False)
    trace = run_optax(optax.lars(0.5, weight_decay=0.01, weight_decay_mask=DECAY_MASK), FIELD)
    assert max(relative_errors(larc, trace).values()) > 1e-3


@pytest.mark.parametrize("config", settings_of("lars"))
def test_single_tensor_and_multi_tensor_paths_agree(config):
    lars = INFOS["lars"]
    single, _ = lars_run(lars.lr, **lars.paths["single"], **config)
    multi, _ = lars_run(lars.lr, **lars.paths["foreach"], **config)
    errors = relative_errors(multi, single)
    assert max(errors.values()) <= 1e-5, errors


def test_tensor_lr_gives_the_float_lr_result():
    floats, _ = lars_run(0.02, preset="larc")
    tensors, _ = run_torch(lambda p: Lars(torch_groups(p, 0.01), lr=torch.tensor(0.02), preset="larc"), FIELD)
    assert max(relative_errors(tensors, floats).values()) <= 1e-6
