"""Lamb against independent references over 50 steps, and agreement of its implementations (``impl``)."""

from __future__ import annotations

import optax
import pytest
import torch
from optim_problem import NOT_DECAYED, GradientField, assert_close, relative_errors, run_torch, torch_groups
from optim_references import (
    DECAY_MASK,
    apex_fused_lamb,
    deepspeed_fused_lamb,
    run_optax,
    tf_addons_lamb,
)
from optim_registry import INFOS, settings_of

from legw_hf import Lamb, SettingError
from legw_hf.optim import lamb as lamb_module

FIELD = GradientField()
LR = INFOS["lamb"].lr


def lamb_run(decay: float = 0.01, no_decay_extra: dict | None = None, **kwargs):
    return run_torch(lambda p: Lamb(torch_groups(p, decay, **(no_decay_extra or {})), lr=LR, **kwargs), FIELD)


@pytest.mark.parametrize("use_nvlamb", [False, True])
def test_nvidia_preset_matches_apex_fused_lamb(use_nvlamb):
    extra = {"adapt": "all"} if use_nvlamb else {}
    result, optimizer = lamb_run(preset="nvidia", **extra)
    assert optimizer.max_grad_norm == 1.0
    assert_close(result, apex_fused_lamb(FIELD, lr=LR, decay=0.01, use_nvlamb=use_nvlamb))


@pytest.mark.parametrize("eps_inside_sqrt", [False, True])
def test_deepspeed_preset_matches_deepspeed_fused_lamb(eps_inside_sqrt):
    result, optimizer = lamb_run(preset="deepspeed", eps_inside_sqrt=eps_inside_sqrt)
    assert_close(result, deepspeed_fused_lamb(FIELD, lr=LR, decay=0.01, eps_inside_sqrt=eps_inside_sqrt))
    # the always-zero gradient makes u = λp, ratio 1/λ = 100, clamped to 10
    assert optimizer.trust_stats[3, 2].item() == pytest.approx(10.0)


def test_deepspeed_preset_with_bing_bert_clamp():
    result, _ = lamb_run(preset="deepspeed", trust_clamp=(0.01, 0.3))
    assert_close(result, deepspeed_fused_lamb(FIELD, lr=LR, decay=0.01, max_coeff=0.3))


def test_optax_preset_matches_optax_lamb():
    result, _ = lamb_run(preset="optax")
    reference = run_optax(optax.lamb(LR, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01, mask=DECAY_MASK), FIELD)
    assert_close(result, reference)


def test_eps_inside_sqrt_matches_optax_eps_root():
    result, _ = lamb_run(preset="optax", eps=1e-6, eps_inside_sqrt=True)
    reference = run_optax(optax.lamb(LR, eps=0.0, eps_root=1e-6, weight_decay=0.01, mask=DECAY_MASK), FIELD)
    assert_close(result, reference)


def test_paper_preset_matches_tf_addons_lamb():
    result, _ = lamb_run(preset="paper")
    assert_close(result, tf_addons_lamb(FIELD, lr=LR, decay=0.01, exclude_from_weight_decay=NOT_DECAYED))


def test_layer_adaptation_group_flags_match_tf_addons_exclusion_lists():
    # decay everywhere but the bias, adaptation everywhere but norm_weight: group flags express both lists
    result, _ = run_torch(
        lambda p: Lamb(
            [
                {"params": [p[n] for n in ("matrix", "kernel", "scalar", "frozen")], "weight_decay": 0.01},
                {"params": [p["norm_weight"]], "weight_decay": 0.01, "layer_adaptation": False},
                {"params": [p["bias"]], "weight_decay": 0.0, "layer_adaptation": True},
            ],
            lr=LR,
            preset="paper",
        ),
        FIELD,
    )
    assert_close(
        result,
        tf_addons_lamb(
            FIELD,
            lr=LR,
            decay=0.01,
            exclude_from_weight_decay=("bias",),
            exclude_from_layer_adaptation=("norm_weight",),
        ),
    )


LAMB = INFOS["lamb"]


FUSED_ADAM_SETTINGS = {"bias_correction": "inside", "eps_inside_sqrt": False, "weight_decay_mode": "decoupled"}


def fits_fused_adam(config: dict) -> bool:
    from legw_hf.optim.lamb import LAMB_DEFAULTS, LAMB_PRESETS

    settings = {**(LAMB_PRESETS[config["preset"]] if "preset" in config else LAMB_DEFAULTS), **config}
    return all(settings[k] == v for k, v in FUSED_ADAM_SETTINGS.items()) and settings["grad_averaging"]


@pytest.mark.parametrize("config", settings_of("lamb"))
def test_every_impl_agrees_with_the_single_tensor_reference(config):
    single, _ = lamb_run(**LAMB.paths["single"], **config)
    for name, path in LAMB.paths.items():
        if name in ("single", "triton"):  # the reference; the Triton kernel has tests of its own
            continue
        if name == "fused-adam" and not fits_fused_adam(config):
            with pytest.raises(SettingError, match="^impl 'fused_adam' needs bias_correction='inside'"):
                lamb_run(**path, **config)
            continue
        multi, optimizer = lamb_run(**path, **config)
        assert optimizer.impl == path["impl"]
        errors = relative_errors(multi, single)
        assert max(errors.values()) <= 1e-5, (name, errors)


def count_kernel_passes(monkeypatch) -> list[int]:
    passes = []
    original = Lamb._kernel_pass

    def counted(self, buckets, grad_divisor, kernel):
        assert kernel is lamb_module._cpu_kernel.load()  # the CPU kernel, not the opt-in Triton one
        passes.append(len(buckets))
        return original(self, buckets, grad_divisor, kernel)

    monkeypatch.setattr(Lamb, "_kernel_pass", counted)
    return passes


def test_cpu_kernel_is_the_default_for_fp32_cpu_tensors(monkeypatch):
    passes = count_kernel_passes(monkeypatch)
    _, optimizer = lamb_run()
    assert optimizer.impl == "cpu" and passes == [2] * 50  # both groups, every step, in one pass
    assert optimizer.workspace_bytes == 0  # the kernel needs no scratch
    passes.clear()
    _, optimizer = lamb_run(impl="fused_adam")
    assert passes == [] and optimizer.impl == "fused_adam"


def test_cpu_kernel_refuses_what_it_cannot_run():
    params = [torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))]
    params[0].grad = torch.randn(4, dtype=torch.bfloat16)
    before = params[0].detach().clone()
    with pytest.raises(SettingError, match="^impl 'cpu' needs contiguous fp32 CPU"):
        Lamb(params, lr=LR, impl="cpu", master_weights=True)
    assert torch.equal(params[0].detach(), before)
    relaxed = Lamb(params, lr=LR, master_weights=True)  # the automatic choice takes torch ops
    assert relaxed.impl == "foreach"
    p, g = params[0].detach().double().clone(), params[0].grad.double()
    relaxed.step()
    # LAMB's first step written out (no preset: ε 1e-6 outside the root, decoupled λ 0.01, bias corrected):
    # m̂ = g, v̂ = g², u = g/(|g| + ε) + λp, p ← p - η·(‖p‖/‖u‖)·u, on the fp32 master of the bf16 parameter
    u = g / (g.abs() + 1e-6) + 0.01 * p
    expected = p - LR * (p.norm() / u.norm()) * u
    master = relaxed.state[params[0]]["master"]
    torch.testing.assert_close(master.double(), expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(params[0].detach(), master.to(torch.bfloat16))


def count_kernel_calls(monkeypatch) -> dict[str, int]:
    calls = {"_fused_adam_": 0, "_fused_adamw_": 0}
    for name in calls:
        kernel = getattr(torch, name)

        def counted(*args, _name=name, _kernel=kernel, **kwargs):
            calls[_name] += 1
            return _kernel(*args, **kwargs)

        monkeypatch.setattr(torch, name, counted)
    return calls


@pytest.fixture
def no_cpu_kernel(monkeypatch):
    """As where LAMB's CPU kernel cannot be built: the automatic choice goes on to torch ops."""
    monkeypatch.setattr(lamb_module._cpu_kernel, "load", lambda: None)


def test_fused_kernels_are_taken_where_the_settings_allow(monkeypatch, no_cpu_kernel):
    calls = count_kernel_calls(monkeypatch)
    for impl in ("reference", "foreach"):
        lamb_run(impl=impl)
    assert calls == {"_fused_adam_": 0, "_fused_adamw_": 0}
    _, optimizer = lamb_run()  # automatic, without the CPU kernel
    assert optimizer.impl == "fused_adam"
    assert calls == {"_fused_adam_": 50 * 2, "_fused_adamw_": 0}  # one call per bucket (two groups) per step
    lamb_run(impl="fused_adam", preset="nvidia")  # pre-normalised gradients: the in-place AdamW form
    assert calls == {"_fused_adam_": 50 * 2, "_fused_adamw_": 50 * 2}
    for config in (
        {"preset": "deepspeed"},
        {"eps_inside_sqrt": True},
        {"weight_decay_mode": "l2"},
        {"grad_averaging": False},
    ):
        _, optimizer = lamb_run(**config)
        assert optimizer.impl == "foreach", config
        with pytest.raises(SettingError, match="^impl 'fused_adam' needs"):
            lamb_run(impl="fused_adam", **config)
    assert calls == {"_fused_adam_": 50 * 2, "_fused_adamw_": 50 * 2}


@pytest.mark.parametrize("kernel", ["_fused_adam_", "_fused_adamw_"])
def test_fused_kernel_self_check_rejects_a_kernel_that_disagrees(kernel, monkeypatch, no_cpu_kernel):
    lamb_module._fused_adam_agrees.cache_clear()
    monkeypatch.setattr(torch, kernel, lambda params, *a, **k: [p.mul_(2) for p in params])
    try:
        in_place = kernel == "_fused_adamw_"
        assert not lamb_module._fused_adam_agrees(in_place=in_place)
        config = {"preset": "nvidia"} if in_place else {}  # a config that would take the patched kernel
        single, _ = lamb_run(impl="reference", **config)
        result, optimizer = lamb_run(**config)  # the check failed, so the plain multi-tensor path runs
        assert optimizer.impl == "foreach"
        assert max(relative_errors(result, single).values()) <= 1e-5
        with pytest.raises(SettingError, match="^impl 'fused_adam' needs torch's fused Adam kernel"):
            lamb_run(impl="fused_adam", **config)
    finally:
        lamb_module._fused_adam_agrees.cache_clear()


def test_tensor_lr_gives_the_float_lr_result():
    floats, _ = lamb_run(preset="nvidia")
    tensors, _ = run_torch(lambda p: Lamb(torch_groups(p, 0.01), lr=torch.tensor(LR), preset="nvidia"), FIELD)
    assert max(relative_errors(tensors, floats).values()) <= 1e-6


def test_one_norm_reduction_per_step_covers_params_and_updates():
    seen = []

    class Recording(Lamb):
        def reduce_squared_norms(self, squares):
            seen.append(squares.shape)
            return squares

    run_torch(lambda p: Recording(torch_groups(p, 0.01), lr=LR), FIELD, steps=3)
    assert seen == [torch.Size([12])] * 3  # 6 params, then 6 updates: one vector, one future all-reduce


def test_the_references_really_differ():
    """Matching one reference must exclude the others, or the preset tests would prove little."""
    references = {
        "nvidia": apex_fused_lamb(FIELD, lr=LR, decay=0.01),
        "deepspeed": deepspeed_fused_lamb(FIELD, lr=LR, decay=0.01),
        "paper": tf_addons_lamb(FIELD, lr=LR, decay=0.01),
        "optax": run_optax(optax.lamb(LR, weight_decay=0.01, mask=DECAY_MASK), FIELD),
    }
    names = list(references)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert max(relative_errors(references[first], references[second]).values()) > 1e-3, (first, second)
