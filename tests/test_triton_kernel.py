"""LAMB's and LARS' Triton kernels (``impl="triton"``) against the single-tensor reference path.

On a machine without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest sets
``TRITON_INTERPRET=1``); with one they are compiled and run on CUDA tensors. The interpreter is slow, so most
tests shrink the chunk to 128 elements (which also puts several chunks in one tensor) and run a few steps; one
test keeps the shipped chunk size. ``test_kernels_compile_for_gpus`` compiles every kernel for real, to cubin for
sm_80 and sm_90, which needs no GPU.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from optim_problem import NAMES, GradientField, initial_params, relative_errors, torch_groups
from optim_registry import INFOS, settings_of
from procs import REPO, python_env
from test_optim_behaviour import HostSyncDetector

from legw_hf import Lamb, Lars, SettingError
from legw_hf.optim import _triton_kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = 5
FIELD = GradientField(steps=STEPS)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(_triton_kernel, "CHUNK", 128)
    monkeypatch.setattr(_triton_kernel, "BLOCK", 64)


def run(make_optimizer, dtype=torch.float32, field=FIELD, params=None, steps=STEPS):
    """Train on the gradient field with parameters of ``dtype`` on DEVICE; final parameters as fp32 arrays."""
    arrays = params if params is not None else initial_params()
    tensors = {n: torch.tensor(a, dtype=dtype, device=DEVICE, requires_grad=True) for n, a in arrays.items()}
    optimizer = make_optimizer(tensors)
    for step in range(steps):
        current = {n: p.detach().float().cpu().numpy() for n, p in tensors.items()}
        for n, grad in field(current, step).items():
            tensors[n].grad = torch.tensor(grad, dtype=dtype, device=DEVICE)
        optimizer.step()
    return {n: p.detach().float().cpu().numpy() for n, p in tensors.items()}, optimizer


def lamb(path: dict, decay=0.01, **kwargs):
    return lambda p: Lamb(torch_groups(p, decay), lr=INFOS["lamb"].lr, **path, **kwargs)


def lars(path: dict, decay=0.01, **kwargs):
    return lambda p: Lars(torch_groups(p, decay), lr=INFOS["lars"].lr, **path, **kwargs)


def larc(path: dict, **kwargs):
    """LARS in LARC's clip mode, which moves far enough in a few steps to be seen in bf16."""
    return lars(path, preset="larc", **kwargs)


REFERENCE, TRITON = INFOS["lamb"].paths["single"], INFOS["lamb"].paths["triton"]
assert INFOS["lars"].paths["single"] == REFERENCE and INFOS["lars"].paths["triton"] == TRITON


def assert_agree(result, reference, tolerance):
    errors = relative_errors(result, reference)
    assert max(errors.values()) <= tolerance, errors
    moved = relative_errors(initial_params(), reference)
    assert min(v for n, v in moved.items() if n != "frozen") > 1e-3, ("the reference barely moved", moved)


@pytest.mark.parametrize("config", settings_of("lamb"))
def test_lamb_kernel_matches_the_single_tensor_reference(config):
    reference, expected = run(lamb(REFERENCE, **config))
    result, optimizer = run(lamb(TRITON, **config))
    assert_agree(result, reference, 1e-5)
    # trust_stats comes from the kernel's norms: ‖p‖, ‖u‖ and the ratio of every tensor
    torch.testing.assert_close(optimizer.trust_stats, expected.trust_stats, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("config", settings_of("lars"))
def test_lars_kernel_matches_the_single_tensor_reference(config):
    reference, expected = run(lars(REFERENCE, **config))
    result, optimizer = run(lars(TRITON, **config))
    assert_agree(result, reference, 1e-5)
    torch.testing.assert_close(optimizer.trust_stats, expected.trust_stats, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_tensor_lr_is_read_on_device(name):
    make = lamb if name == "lamb" else lars
    floats, _ = run(make(TRITON, preset="nvidia" if name == "lamb" else "larc"))
    lr = torch.tensor(1e-2 if name == "lamb" else 0.5, device=DEVICE)
    cls = Lamb if name == "lamb" else Lars
    preset = "nvidia" if name == "lamb" else "larc"
    tensors, _ = run(lambda p: cls(torch_groups(p, 0.01), lr=lr, preset=preset, impl="triton"))
    assert max(relative_errors(tensors, floats).values()) <= 1e-6


@pytest.mark.parametrize("name", ["lamb", "lars"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_masters_of_half_precision_parameters(name, dtype):
    """The kernel updates the fp32 masters and writes the rounded parameters in the same pass: the masters agree
    with the reference path's to fp32 tolerance, the parameters are those masters rounded to nearest."""
    make = lamb if name == "lamb" else larc
    reference, expected = run(make(REFERENCE, master_weights=True), dtype=dtype)
    result, optimizer = run(make(TRITON, master_weights=True), dtype=dtype)
    masters = [optimizer.state[p]["master"] for g in optimizer.param_groups for p in g["params"]]
    expected_masters = [expected.state[p]["master"] for g in expected.param_groups for p in g["params"]]
    for master, expected_master in zip(masters, expected_masters, strict=True):
        torch.testing.assert_close(master, expected_master, rtol=1e-5, atol=1e-6)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for param, master in zip(params, masters, strict=True):
        assert param.dtype == dtype and torch.equal(param, master.to(dtype))  # round to nearest even, as torch
    assert_agree(result, reference, 1e-2)


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_bf16_parameters_without_masters_keep_fp32_state(name):
    make = lamb if name == "lamb" else larc
    reference, _ = run(make(REFERENCE), dtype=torch.bfloat16)
    result, optimizer = run(make(TRITON), dtype=torch.bfloat16)
    state_dtypes = {t.dtype for s in optimizer.state.values() for k, t in s.items() if k != "step"}
    assert state_dtypes == {torch.float32}
    # both paths round to bf16 after every step from the same fp32 math; a flipped rounding is one bf16 ulp
    assert_agree(result, reference, 1e-2)


SIZES = {"long": (300,), "two_chunks": (2, 128), "just_over": (129,), "tiny": (3,), "zeros": (130,)}


def odd_size_params():
    rng = np.random.default_rng(3)
    params = {name: rng.normal(0, 0.5, shape).astype(np.float32) for name, shape in SIZES.items()}
    params["zeros"][...] = 0.0  # ‖p‖ = 0 and (below) ‖g‖ = 0: every reference's ratio is 1 there
    return params


class OddField:
    def __init__(self, steps: int = STEPS) -> None:
        rng = np.random.default_rng(4)
        self.noise = [{n: rng.normal(size=s).astype(np.float32) for n, s in SIZES.items()} for _ in range(steps)]

    def __call__(self, params, step):
        grads = {n: (params[n] + 0.3 * self.noise[step][n]).astype(np.float32) for n in params}
        grads["zeros"][...] = 0.0
        return grads


def odd_groups(tensors, decay):
    return [{"params": list(tensors.values()), "param_names": list(tensors), "weight_decay": decay}]


@pytest.mark.parametrize("name", ["lamb-nvidia", "lamb-deepspeed", "lars-larc"])
def test_tensors_across_several_chunks_and_zero_norms(name):
    optimizer, preset = name.split("-")
    cls = Lamb if optimizer == "lamb" else Lars
    lr = 1e-2 if cls is Lamb else 0.5

    def make(path):
        return lambda p: cls(odd_groups(p, 0.01), lr=lr, preset=preset, **path)

    field = OddField()
    reference, expected = run(make(REFERENCE), field=field, params=odd_size_params())
    result, stats = run(make(TRITON), field=field, params=odd_size_params())
    errors = relative_errors(result, reference)
    assert max(errors.values()) <= 1e-5, errors
    torch.testing.assert_close(stats.trust_stats, expected.trust_stats, rtol=1e-5, atol=1e-7)
    zeros = list(SIZES).index("zeros")
    assert stats.trust_stats[zeros].tolist() == [0.0, 0.0, 1.0]  # ‖p‖ = 0 and a zero update: ratio 1
    assert not np.any(np.isnan(np.concatenate([r.ravel() for r in result.values()])))


def test_the_shipped_chunk_size(monkeypatch):
    """One tensor above one chunk of the shipped size (16384 elements, 1024 per iteration)."""
    monkeypatch.setattr(_triton_kernel, "CHUNK", 16384)
    monkeypatch.setattr(_triton_kernel, "BLOCK", 1024)
    generator = torch.Generator().manual_seed(0)
    initial = [torch.randn(16384 + 37, generator=generator), torch.randn(5, generator=generator)]
    grads = [[torch.randn(t.shape, generator=generator) for t in initial] for _ in range(2)]

    def train(**path):
        params = [torch.nn.Parameter(t.clone().to(DEVICE)) for t in initial]
        optimizer = Lamb(params, lr=1e-2, preset="nvidia", **path)
        for step in grads:
            for param, grad in zip(params, step, strict=True):
                param.grad = grad.to(DEVICE)
            optimizer.step()
        return [p.detach().cpu() for p in params]

    for result, reference in zip(train(impl="triton"), train(impl="reference"), strict=True):
        torch.testing.assert_close(result, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_partial_squares_take_the_one_reduction_hook(name):
    """Sharded runs make the kernel's per-tensor squares whole in ``reduce_squared_norms``: one call per step, with
    ‖p‖² and the ratio's denominator squared for every tensor (the all-reduce itself: tests/test_sharded.py)."""
    seen = []
    base = Lamb if name == "lamb" else Lars

    class Recording(base):
        def reduce_squared_norms(self, squares):
            seen.append(squares.shape)
            return squares

    lr = 1e-2 if name == "lamb" else 0.5
    run(lambda p: Recording(torch_groups(p, 0.01), lr=lr, impl="triton"), steps=3)
    assert seen == [torch.Size([2 * len(NAMES)])] * 3


def test_step_does_not_sync_with_the_host():
    tensors = {n: torch.tensor(a, device=DEVICE, requires_grad=True) for n, a in initial_params().items()}
    optimizers = [
        Lamb(torch_groups(tensors, 0.01), lr=torch.tensor(1e-2, device=DEVICE), preset="nvidia", impl="triton"),
        Lars(torch_groups(tensors, 0.01), lr=0.5, preset="larc", impl="triton"),
    ]
    for optimizer in optimizers:
        for step in range(2):  # the second step reuses the cached address table
            for n, grad in FIELD({n: a for n, a in initial_params().items()}, step).items():
                tensors[n].grad = torch.tensor(grad, device=DEVICE)
            with HostSyncDetector():
                optimizer.step()


def test_state_dict_round_trip_equals_never_stopping():
    uninterrupted, _ = run(lamb(TRITON, preset="nvidia"))
    params = {n: torch.tensor(a, device=DEVICE, requires_grad=True) for n, a in initial_params().items()}
    first = Lamb(torch_groups(params, 0.01), lr=1e-2, preset="nvidia", impl="triton")
    for step in range(STEPS):
        if step == 2:
            saved = first.state_dict()
            first = Lamb(torch_groups(params, 0.01), lr=1e-2, preset="nvidia", impl="triton")
            first.load_state_dict(saved)
        current = {n: p.detach().cpu().numpy() for n, p in params.items()}
        for n, grad in FIELD(current, step).items():
            params[n].grad = torch.tensor(grad, device=DEVICE)
        first.step()
    resumed = {n: p.detach().cpu().numpy() for n, p in params.items()}
    assert relative_errors(resumed, uninterrupted) == dict.fromkeys(NAMES, 0.0)


def test_what_the_kernels_cannot_take_is_refused_with_the_field():
    doubles = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64, device=DEVICE))]
    doubles[0].grad = torch.ones_like(doubles[0])
    for cls in (Lamb, Lars):  # at construction, from the parameters
        with pytest.raises(SettingError, match=r"^impl 'triton' needs contiguous fp32, bf16 or fp16 tensors"):
            cls(doubles, lr=0.1, impl="triton")
    with pytest.raises(SettingError, match="^impl must be one of None, 'reference', 'foreach', 'fused_adam', 'cpu'"):
        Lamb(doubles, impl="cuda")
    with pytest.raises(SettingError, match="^impl must be one of None, 'reference', 'foreach', 'triton'"):
        Lars(doubles, lr=0.1, impl="cpu")
    # the deprecated spellings keep their checks
    with pytest.raises(SettingError, match="^fused must be one of None, False, 'triton'"):
        Lars(doubles, lr=0.1, fused=True)
    with pytest.raises(SettingError, match="^fused needs the multi-tensor path"):
        Lars(doubles, lr=0.1, fused="triton", foreach=False)
    assert float(doubles[0].detach().sum()) == 0.0


def test_a_missing_triton_is_named_before_any_step():
    """Without the triton package (a plain install), ``impl="triton"`` says how to get it when it is built."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\nfrom legw_hf import Lamb, SettingError\n"
        "try:\n    Lamb([torch.nn.Parameter(torch.zeros(2))], impl='triton')\n"
        "except SettingError as error:\n    print(error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=python_env(), check=True)
    assert "impl 'triton' needs the triton package: pip install 'legw_hf[gpu]'" in out.stdout, out


def test_kernels_compile_for_gpus():
    """Every kernel variant the optimizers launch, compiled by Triton's real compiler to sm_90 cubin, and every kernel
    to sm_80 (no GPU needed); whole aligned chunks must use 16-byte vector loads and stores."""
    env = python_env()
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run(
        [sys.executable, str(REPO / "tests" / "scripts" / "compile_triton_kernels.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    compiled = json.loads(out.stdout)
    assert len(compiled) >= 20
    kernels = {label.split("[")[0] for label in compiled}
    assert {label.split("[")[0] for label in compiled if label.endswith("@sm_80")} == kernels
    for name, report in compiled.items():
        assert report["cubin_bytes"] > 0, name
        if report["aligned"]:
            assert report["vector_loads"] > 0, (name, report)
            assert report["vector_stores"] > 0 or not report["stores_tensors"], (name, report)


def test_gpu_benchmark_smoke_runs_every_peer(tmp_path):
    """benchmarks/gpu_step.py --smoke (interpreted here): every row is timed or says why it could not run."""
    output = tmp_path / "gpu.json"
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "gpu_step.py"),
        "--smoke",
        "--no-trainer",
        "--json",
        str(output),
    ]
    out = subprocess.run(command, capture_output=True, text=True, env=python_env(), timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(output.read_text())
    names = [row["optimizer"] for table in report["tables"] for row in table["rows"]]
    assert "legw_hf Lamb impl='triton'" in names and "legw_hf Lars impl='triton'" in names
    for table in report["tables"]:
        for row in table["rows"]:
            assert row["ms"] > 0 if "not_run" not in row else row["not_run"], row
            if "triton" in row["optimizer"]:
                assert "not_run" not in row, row


def test_gpu_benchmark_refuses_a_bad_flag_before_any_work(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    gpu_step = importlib.import_module("gpu_step")
    with pytest.raises(SystemExit) as refused:
        gpu_step.parse_args(["--steps", "0", "--smoke"])
    assert refused.value.code == 2 and "--steps must be >= 1, got 0" in capsys.readouterr().err
