"""One implementation per step (``impl``): the automatic choice, its cache per tensor signature, the refusals at
construction and at a changed step, the deprecated spellings, and the probe of ``check_optimizer``."""

from __future__ import annotations

import warnings

import pytest
import torch
from optim_problem import GradientField, relative_errors, run_torch, torch_groups
from torch import nn

from legw_hf import Lamb, Lars, SettingError
from legw_hf.optim import _dispatch, lamb as lamb_module
from legw_hf.optim.choice import check_optimizer, optimizer_class_and_keywords


def params(dtype: torch.dtype = torch.float32, count: int = 3, seed: int = 0) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(4, 3, generator=generator).to(dtype)) for _ in range(count)]


def set_grads(tensors: list[nn.Parameter], seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for tensor in tensors:
        tensor.grad = torch.randn(tensor.shape, generator=generator).to(tensor.dtype)


@pytest.fixture
def no_cpu_kernel(monkeypatch):
    """As where LAMB's CPU kernel cannot be built."""
    monkeypatch.setattr(lamb_module._cpu_kernel, "load", lambda: None)


@pytest.fixture
def decisions(monkeypatch) -> list[str]:
    """The name of every decision :class:`~legw_hf.optim._dispatch.Dispatch` makes (not the cached look-ups)."""
    made = []
    original = _dispatch.Dispatch._decide

    def counted(self, signature):
        impl = original(self, signature)
        made.append(impl.name)
        return impl

    monkeypatch.setattr(_dispatch.Dispatch, "_decide", counted)
    return made


# ------------------------------------------------------------------------------------------ automatic choice
def test_automatic_choice_is_the_best_that_fits_every_tensor(no_cpu_kernel):
    assert Lamb(params()).impl == "fused_adam"  # fp32 CPU, where the CPU kernel cannot be built
    assert Lamb(params(), preset="deepspeed").impl == "foreach"  # settings fused Adam cannot take
    assert Lamb(params(torch.bfloat16), master_weights=True).impl == "foreach"
    assert Lamb(params(torch.bfloat16)).impl == "foreach"
    assert Lars(params(), lr=0.1).impl == "foreach"
    assert Lars(params(torch.bfloat16), lr=0.1, master_weights=True).impl == "foreach"


def test_automatic_choice_on_fp32_cpu_is_the_cpu_kernel():
    assert Lamb(params()).impl == "cpu"
    assert Lamb(params(), preset="deepspeed").impl == "cpu"  # the kernel takes every setting
    assert Lamb(params(torch.bfloat16), master_weights=True).impl == "foreach"
    transposed = [nn.Parameter(torch.randn(3, 4).t())]  # not contiguous
    assert Lamb(transposed).impl == "fused_adam"
    assert Lamb(params(), lr=torch.tensor(1e-3)).impl == "cpu"  # a CPU tensor LR


@pytest.mark.parametrize("cpu_kernel", [True, False])
def test_one_implementation_for_every_bucket_of_a_step(cpu_kernel, monkeypatch):
    """Two groups, one that torch's fused Adam kernel could take and one it could not: one implementation runs
    both (the CPU kernel, or where it cannot be built, _foreach_ ops for both, not fused Adam for one)."""
    if not cpu_kernel:
        monkeypatch.setattr(lamb_module._cpu_kernel, "load", lambda: None)
    fused_calls, kernel_passes = [], []
    lamb_module._fused_adam_agrees()  # checked (and cached) before the count starts
    fused_adam = torch._fused_adam_
    monkeypatch.setattr(torch, "_fused_adam_", lambda *a, **k: fused_calls.append(1) or fused_adam(*a, **k))
    original = Lamb._kernel_pass
    monkeypatch.setattr(
        Lamb,
        "_kernel_pass",
        lambda self, buckets, *a: kernel_passes.append(len(buckets)) or original(self, buckets, *a),
    )
    first, second = params(count=2), params(count=2, seed=3)
    optimizer = Lamb([{"params": first}, {"params": second, "eps_inside_sqrt": True}], lr=1e-2)
    assert optimizer.impl == ("cpu" if cpu_kernel else "foreach")
    set_grads(first + second)
    optimizer.step()
    assert fused_calls == []
    assert kernel_passes == ([2] if cpu_kernel else [])

    reference = Lamb(
        [{"params": params(count=2)}, {"params": params(count=2, seed=3), "eps_inside_sqrt": True}],
        lr=1e-2,
        impl="reference",
    )
    reference_params = [p for group in reference.param_groups for p in group["params"]]
    set_grads(reference_params)
    reference.step()
    for result, expected in zip(first + second, reference_params, strict=True):
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-7)


def test_mixed_dtypes_take_one_implementation(monkeypatch):
    kernel_passes = []
    original = Lamb._kernel_pass
    monkeypatch.setattr(
        Lamb,
        "_kernel_pass",
        lambda self, buckets, *a: kernel_passes.append(len(buckets)) or original(self, buckets, *a),
    )
    full, half = params(count=2), params(torch.bfloat16, count=2)
    optimizer = Lamb([{"params": full}, {"params": half}], lr=1e-2, master_weights=True)
    assert optimizer.impl == "foreach"  # the fp32 group alone would take the CPU kernel
    set_grads(full + half)
    optimizer.step()
    assert kernel_passes == [] and optimizer.impl == "foreach"


# ---------------------------------------------------------------------------------------------- agreement
FIELD = GradientField(steps=10)


@pytest.mark.parametrize("impl", ["foreach", "fused_adam", "cpu", "triton", None])
def test_every_lamb_impl_gives_the_reference_result(impl, monkeypatch):
    from legw_hf.optim import _triton_kernel

    monkeypatch.setattr(_triton_kernel, "CHUNK", 128)  # the interpreter is slow; several chunks per tensor
    monkeypatch.setattr(_triton_kernel, "BLOCK", 64)
    reference, _ = run_torch(lambda p: Lamb(torch_groups(p, 0.01), lr=1e-2, impl="reference"), FIELD, steps=10)
    result, optimizer = run_torch(lambda p: Lamb(torch_groups(p, 0.01), lr=1e-2, impl=impl), FIELD, steps=10)
    assert optimizer.impl == (impl or "cpu")
    assert max(relative_errors(result, reference).values()) <= 1e-5


@pytest.mark.parametrize("impl", ["foreach", "triton", None])
def test_every_lars_impl_gives_the_reference_result(impl, monkeypatch):
    from legw_hf.optim import _triton_kernel

    monkeypatch.setattr(_triton_kernel, "CHUNK", 128)
    monkeypatch.setattr(_triton_kernel, "BLOCK", 64)
    reference, _ = run_torch(lambda p: Lars(torch_groups(p, 0.01), lr=0.5, impl="reference"), FIELD, steps=10)
    result, optimizer = run_torch(lambda p: Lars(torch_groups(p, 0.01), lr=0.5, impl=impl), FIELD, steps=10)
    assert optimizer.impl == (impl or "foreach")
    assert max(relative_errors(result, reference).values()) <= 1e-5


# ---------------------------------------------------------------------------------- refusals at construction
@pytest.mark.parametrize(
    "cls,kwargs,dtype,message",
    [
        (Lamb, {"impl": "cpu"}, torch.bfloat16, "'cpu' needs contiguous fp32 CPU"),
        (Lamb, {"impl": "cpu", "master_weights": True}, torch.bfloat16, "'cpu' needs contiguous fp32 CPU"),
        (Lamb, {"impl": "fused_adam", "eps_inside_sqrt": True}, torch.float32, "'fused_adam' needs bias_correction"),
        (Lamb, {"impl": "fused_adam", "grad_averaging": False}, torch.float32, "'fused_adam' needs bias_correction"),
        (Lamb, {"impl": "fused_adam", "bias_correction": "off"}, torch.float32, "'fused_adam' needs bias_correction"),
        (Lamb, {"impl": "fused_adam"}, torch.bfloat16, "'fused_adam' needs fp32 parameters"),
        (Lamb, {"impl": "triton"}, torch.float64, "'triton' needs contiguous fp32, bf16 or fp16"),
        (Lars, {"impl": "triton"}, torch.float64, "'triton' needs contiguous fp32, bf16 or fp16"),
        (Lamb, {"impl": "gpu"}, torch.float32, "must be one of None, 'reference', 'foreach', 'fused_adam', 'cpu'"),
        (Lars, {"impl": "fused_adam"}, torch.float32, "must be one of None, 'reference', 'foreach', 'triton'"),
        (Lamb, {"impl": "foreach", "fused_adam": False}, torch.float32, "cannot be combined with the deprecated"),
        (Lars, {"impl": "triton", "fused": "triton"}, torch.float32, "cannot be combined with the deprecated"),
    ],
)
def test_contradictions_are_refused_at_construction(cls, kwargs, dtype, message):
    tensors = params(dtype)
    set_grads(tensors)
    before = [t.detach().clone() for t in tensors]
    with pytest.raises(SettingError, match=f"^impl {message}") as caught:
        cls(tensors, lr=0.1, **kwargs)
    assert caught.value.field == "impl"
    assert "None" in str(caught.value)  # the values that fit, or the valid ones
    assert all(torch.equal(t, b) for t, b in zip(tensors, before, strict=True))


def test_an_added_group_that_fused_adam_cannot_take_is_refused_at_the_next_step():
    first, second = params(count=1), params(count=1, seed=2)
    optimizer = Lamb(first, lr=1e-2, impl="fused_adam")
    optimizer.add_param_group({"params": second, "eps_inside_sqrt": True})
    set_grads(first + second)
    before = [t.detach().clone() for t in first + second]
    with pytest.raises(SettingError, match="^impl 'fused_adam' needs bias_correction"):
        optimizer.step()
    assert all(torch.equal(t, b) for t, b in zip(first + second, before, strict=True))


# ------------------------------------------------------------------------------------ signature changes
def test_the_choice_is_made_once_per_signature(decisions):
    tensors = params()
    optimizer = Lamb(tensors, lr=1e-2)
    assert decisions == ["cpu"]
    for seed in range(4):
        set_grads(tensors, seed)
        optimizer.step()
    assert decisions == ["cpu"]  # the first step's tensors are those it was built with: looked up, not re-decided
    for tensor in tensors:  # the model moves to bf16 (moments stay fp32): decided again, once
        tensor.data = tensor.data.to(torch.bfloat16)
    for seed in range(3):
        set_grads(tensors, seed)
        optimizer.step()
    assert decisions == ["cpu", "foreach"] and optimizer.impl == "foreach"
    for tensor in tensors:  # and back: the earlier choice, cached
        tensor.data = tensor.data.float()
    set_grads(tensors)
    optimizer.step()
    assert decisions == ["cpu", "foreach"] and optimizer.impl == "cpu"


def test_a_choice_made_at_a_step_never_builds_the_cpu_kernel(decisions, monkeypatch):
    """Built on bf16 parameters (no kernel wanted), then handed fp32 CPU tensors (as DeepSpeed hands flat fp32
    partitions): the step takes the best implementation that needs no build rather than compile for 30 s."""
    loads = []
    monkeypatch.setattr(lamb_module._cpu_kernel, "load", lambda: loads.append(1))
    tensors = params(torch.bfloat16)
    optimizer = Lamb(tensors, lr=1e-2)
    for tensor in tensors:
        tensor.data = tensor.data.float()
    set_grads(tensors)
    optimizer.step()
    assert decisions == ["foreach", "fused_adam"] and optimizer.impl == "fused_adam" and loads == []


@pytest.mark.parametrize("impl", ["cpu", "fused_adam"])
def test_an_explicit_impl_the_new_tensors_do_not_fit_is_refused_at_that_step(impl):
    tensors = params()
    optimizer = Lamb(tensors, lr=1e-2, impl=impl)
    set_grads(tensors)
    optimizer.step()
    for tensor in tensors:
        tensor.data = tensor.data.to(torch.bfloat16)
    set_grads(tensors, 2)
    before = [t.detach().clone() for t in tensors]
    steps = [optimizer.state[t]["step"].clone() for t in tensors]
    with pytest.raises(SettingError, match=f"^impl '{impl}' needs") as caught:
        optimizer.step()
    assert "changed since the optimizer was built with cpu float32" in str(caught.value)
    assert "found cpu bfloat16" in str(caught.value)
    assert all(torch.equal(t, b) for t, b in zip(tensors, before, strict=True))
    assert all(torch.equal(optimizer.state[t]["step"], s) for t, s in zip(tensors, steps, strict=True))


def test_lars_triton_refuses_tensors_it_cannot_take_at_the_step():
    tensors = params()
    optimizer = Lars(tensors, lr=0.1, impl="triton")
    for tensor in tensors:
        tensor.data = tensor.data.double()
    set_grads(tensors)
    with pytest.raises(SettingError, match="^impl 'triton' needs contiguous") as caught:
        optimizer.step()
    assert "changed since" in str(caught.value)


# --------------------------------------------------------------------------------------- deprecations
@pytest.mark.parametrize(
    "kwargs,impl,candidates,advice",
    [
        ({"foreach": False}, "reference", lamb_module.AUTOMATIC, "impl='reference'"),
        ({"foreach": True}, None, ("cpu", "fused_adam", "foreach"), "impl=None"),
        ({"fused": True}, "cpu", lamb_module.AUTOMATIC, "impl='cpu'"),
        ({"fused": "cpu"}, "cpu", lamb_module.AUTOMATIC, "impl='cpu'"),
        ({"fused": "triton"}, "triton", lamb_module.AUTOMATIC, "impl='triton'"),
        ({"fused_adam": True}, "fused_adam", lamb_module.AUTOMATIC, "impl='fused_adam'"),
        ({"fused_adam": False}, None, ("cpu", "foreach"), "impl=None"),
        ({"fused": False}, None, ("fused_adam", "foreach"), "impl='fused_adam' or impl='foreach'"),
        ({"fused": False, "fused_adam": False}, None, ("foreach",), "impl='foreach'"),
        ({"fused": False, "fused_adam": True}, "fused_adam", lamb_module.AUTOMATIC, "impl='fused_adam'"),
        ({"fused": "cpu", "fused_adam": False}, "cpu", lamb_module.AUTOMATIC, "impl='cpu'"),
    ],
    ids=str,
)
def test_deprecated_lamb_spellings_warn_and_map_to_impl(kwargs, impl, candidates, advice):
    with pytest.warns(DeprecationWarning, match=f"is deprecated.*pass {advice}".replace("(", r"\(")):
        optimizer = Lamb(params(), lr=1e-2, **kwargs)
    assert optimizer.requested_impl == impl
    assert optimizer._dispatch.candidates == candidates
    assert optimizer.impl == (impl or candidates[0])


@pytest.mark.parametrize(
    "kwargs,impl",
    [
        ({"foreach": False}, "reference"),
        ({"foreach": True}, None),
        ({"fused": "triton"}, "triton"),
        ({"fused": False}, None),
    ],
    ids=str,
)
def test_deprecated_lars_spellings_warn_and_map_to_impl(kwargs, impl):
    with pytest.warns(DeprecationWarning, match=f"pass impl={impl!r}" if impl else "pass impl=None"):
        optimizer = Lars(params(), lr=0.1, **kwargs)
    assert optimizer.requested_impl == impl and optimizer.impl == (impl or "foreach")


def test_deprecated_fused_false_runs_torch_ops_only(monkeypatch):
    passes = []
    monkeypatch.setattr(Lamb, "_kernel_pass", lambda *a: passes.append(1))
    tensors = params()
    with pytest.warns(DeprecationWarning):
        optimizer = Lamb(tensors, lr=1e-2, fused=False)
    set_grads(tensors)
    optimizer.step()
    assert optimizer.impl == "fused_adam" and passes == []


def test_the_new_spelling_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        Lamb(params(), lr=1e-2, impl="foreach")
        Lars(params(), lr=0.1, impl="reference")
        optimizer_class_and_keywords("lamb", 1e-3, impl="cpu")


# ---------------------------------------------------------------------------------- optimizers by name
def test_check_optimizer_checks_the_impl_value_not_the_probe_tensor(monkeypatch):
    def no_build():
        raise AssertionError("the probe must not build the CPU kernel")

    monkeypatch.setattr(lamb_module._cpu_kernel, "load", no_build)
    for impl in ("cpu", "triton", "fused_adam", "foreach", "reference", None):
        assert check_optimizer("lamb", 1e-3, impl=impl).requested_impl == impl
    assert check_optimizer("lamb", 1e-3).impl is None  # left to the run's tensors
    assert check_optimizer("lars", 0.1, impl="triton").requested_impl == "triton"
    with pytest.raises(SettingError) as caught:
        check_optimizer("lamb", 1e-3, impl="fused_adam", preset="deepspeed")
    assert caught.value.field == "impl"
    with pytest.raises(SettingError, match="^impl must be one of None, 'reference', 'foreach', 'triton'"):
        check_optimizer("lars", 0.1, impl="cpu")
    with pytest.warns(DeprecationWarning, match="pass impl='cpu'"):
        assert check_optimizer("lamb", 1e-3, fused="cpu").requested_impl == "cpu"


def test_the_fused_keyword_maps_to_impl():
    with pytest.warns(DeprecationWarning, match="fused='triton' is deprecated.*pass impl='triton'"):
        assert optimizer_class_and_keywords("lars", 0.1, fused="triton")[1] == {"lr": 0.1, "impl": "triton"}
    with pytest.warns(DeprecationWarning, match="pass impl='cpu'"):
        assert optimizer_class_and_keywords("lamb", 0.1, fused="cpu")[1] == {"lr": 0.1, "impl": "cpu"}
    _, kwargs = optimizer_class_and_keywords("lamb", 0.1, fused="off")
    assert kwargs == {"lr": 0.1, "fused": False}  # the optimizer's own deprecated spelling: torch ops only
    with pytest.warns(DeprecationWarning, match="pass impl='fused_adam' or impl='foreach'"):
        assert Lamb(params(), **kwargs).impl == "fused_adam"
    with pytest.raises(SettingError, match="^fused must be one of 'triton', 'off' for optimizer 'lars'"):
        optimizer_class_and_keywords("lars", 0.1, fused="cpu")
    with pytest.raises(SettingError, match="^fused cannot be combined with impl"):
        optimizer_class_and_keywords("lamb", 0.1, fused="cpu", impl="cpu")


@pytest.mark.parametrize(
    ("impl", "attributes"),
    [
        ("reference", {"foreach": False, "fused": None, "fused_adam": None}),
        ("cpu", {"foreach": None, "fused": "cpu", "fused_adam": None}),
        ("fused_adam", {"foreach": None, "fused": None, "fused_adam": True}),
    ],
)
def test_the_replaced_attributes_read_as_the_keywords_would_have_been_and_warn(impl, attributes):
    optimizer = Lamb(params(), lr=1e-2, impl=impl)
    for name, value in attributes.items():
        with pytest.warns(DeprecationWarning, match=f"attribute '{name}' is deprecated"):
            assert getattr(optimizer, name) == value
