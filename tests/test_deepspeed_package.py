"""legw_hf's DeepSpeed knowledge in one package: plain Python where it writes configs, its old module names kept
for a release, and reached by the optimizers only through the engine-adapter hook, also from a script that imports
nothing of legw_hf's integrations. These run without DeepSpeed (a stand-in of its stage-0 wrapper);
test_sharded.py runs the real engines."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from procs import REPO, python_env

from legw_hf import SettingError
from legw_hf.integrations.deepspeed import clip_once


def run_python(code: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=python_env(), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_the_package_writes_configs_without_torch_or_deepspeed():
    result = run_python(
        "import sys\n"
        "from legw_hf.integrations.deepspeed import deepspeed_config, split_global_batch\n"
        "import legw_hf.cli\n"
        "deepspeed_config(zero=2, split=split_global_batch(64, nodes=1, gpus_per_node=2, micro_batch=4))\n"
        "print(sorted(m for m in ('torch', 'deepspeed') if m in sys.modules))\n"
    )
    assert result.stdout.strip() == "[]"


def test_the_old_module_name_still_imports_with_a_deprecation_warning():
    result = run_python(
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import legw_hf.distributed.deepspeed as old\n"
        "    from legw_hf.distributed.deepspeed import attach, layouts_of\n"
        "import legw_hf.integrations.deepspeed.layouts as new\n"
        "assert old is new and attach is new.attach and layouts_of is new.layouts_of\n"
        "print(caught[0].category.__name__, caught[0].message)\n"
    )
    assert result.stdout.strip() == (
        "DeprecationWarning legw_hf.distributed.deepspeed moved to legw_hf.integrations.deepspeed.layouts; the old "
        "name goes in the next release"
    )


#: The optimizers and what they are built on: they know engines only through legw_hf.engines.
CORE = [*sorted((REPO / "legw_hf" / "optim").glob("*.py")), *sorted((REPO / "legw_hf" / "distributed").glob("*.py"))]
CORE = [path for path in CORE if path.name != "deepspeed.py"] + [REPO / "legw_hf" / "engines.py"]


@pytest.mark.parametrize("path", CORE, ids=lambda path: str(path.relative_to(REPO)))
def test_the_optimizer_core_imports_nothing_of_deepspeed_nor_names_its_integration(path):
    tree = ast.parse(path.read_text())
    scopes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))]
    docstrings = {id(n.body[0].value) for n in scopes if n.body and isinstance(n.body[0], ast.Expr)}
    for node in ast.walk(tree):
        if id(node) in docstrings:  # prose may point at the integration; code may not
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or "", *(alias.name for alias in node.names)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value] if "legw_hf.integrations" in node.value or "deepspeed." in node.value else []
        else:
            continue
        assert not [name for name in names if "deepspeed" in name or "integrations" in name], (path, node.lineno)


#: DeepSpeed's stage-0 fp16/bf16 wrapper (FP16_UnfusedOptimizer), as much of it as legw_hf reads: fp32 copies of
#: the parameters put in the client's groups, and one step() on zero gradients at start-up to make the state exist.
STAGE0_WRAPPER = """
import sys, types
import torch
from torch import nn
from legw_hf import Lamb

class FP16_UnfusedOptimizer:
    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.fp16_groups = [list(group["params"]) for group in optimizer.param_groups]
        self.fp32_groups = [[p.detach().clone().requires_grad_() for p in group] for group in self.fp16_groups]
        for group, copies in zip(optimizer.param_groups, self.fp32_groups):
            group["params"] = copies
        self.initialize_optimizer_states()

    def initialize_optimizer_states(self):
        for copy in self.fp32_groups[0]:
            copy.grad = torch.zeros_like(copy)
        self.optimizer.step()

    def step(self):
        for original, copy in zip(self.fp16_groups[0], self.fp32_groups[0]):
            copy.grad = original.grad.clone()
        self.optimizer.step()
        for original, copy in zip(self.fp16_groups[0], self.fp32_groups[0]):
            original.data.copy_(copy.detach())

FP16_UnfusedOptimizer.__module__ = "deepspeed.runtime.fp16.unfused_optimizer"
ADAPTER = "legw_hf.integrations.deepspeed.layouts"

def model_and_grads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    model(torch.randn(5, 4)).square().sum().backward()
    return model
"""


def test_a_script_handing_the_optimizer_to_deepspeed_itself_gets_its_layouts_through_the_hook():
    # as deepspeed.initialize(model=..., optimizer=Lamb(...)): nothing of legw_hf.integrations imported by the script
    result = run_python(
        STAGE0_WRAPPER
        + """
reference = model_and_grads()
Lamb(reference.parameters(), lr=0.1, weight_decay=0.01).step()
model = model_and_grads()
optimizer = Lamb(model.parameters(), lr=0.1, weight_decay=0.01)
assert ADAPTER not in sys.modules
sys.modules["deepspeed"] = types.ModuleType("deepspeed")  # the engine is loaded: its adapter is consulted
wrapper = FP16_UnfusedOptimizer(optimizer)
assert ADAPTER in sys.modules and len(optimizer.layouts) == 4 and optimizer.state  # state made ...
before = [p.detach().clone() for p in model.parameters()]
assert all(torch.equal(c, p) for c, p in zip(wrapper.fp32_groups[0], before))  # ... and nothing moved
wrapper.step()
for got, want in zip(model.parameters(), reference.parameters()):
    torch.testing.assert_close(got, want)
print(tuple(optimizer.trust_stats.shape))
"""
    )
    assert result.stdout.strip() == "(4, 3)"


def test_without_an_engine_loaded_no_adapter_is_imported_and_a_swapped_tensor_is_refused():
    result = run_python(
        STAGE0_WRAPPER
        + """
from legw_hf import SettingError
model = model_and_grads()
Lamb(model.parameters(), lr=0.1).step()
assert ADAPTER not in sys.modules and "legw_hf.integrations" not in sys.modules and "deepspeed" not in sys.modules
try:
    FP16_UnfusedOptimizer(Lamb(model.parameters(), lr=0.1))
except SettingError as error:
    print(error)
"""
    )
    assert "found an unknown tensor of shape (3, 4)" in result.stdout


@pytest.mark.parametrize("clipping", [None, "auto", 0, 0.0, 1.0])
def test_deepspeeds_clipping_stays_when_the_lamb_does_not_pre_normalise(clipping):
    assert clip_once(clipping, None) is None


def test_one_rule_has_gradients_clipped_once_beside_pre_normalisation():
    assert clip_once("auto", 1.0) is None and clip_once(0, 1.0) is None  # Trainer fills "auto" with its 0
    note = clip_once(None, 1.0)  # DeepSpeed would clip at its default
    assert note.endswith("DeepSpeed's own clipping (default 1.0) is turned off too (gradient_clipping=0).")
    with pytest.raises(SettingError) as in_config:
        clip_once(0.5, 2.0, lamb="--legw_optimizer lamb", lamb_off="--legw_lamb_max_grad_norm 0")
    message = str(in_config.value)
    assert message.startswith('gradient_clipping must be "auto" or 0 in the DeepSpeed config when --legw_optimizer')
    assert "(max norm 2): DeepSpeed would clip a second time" in message and "--legw_lamb_max_grad_norm 0" in message
    with pytest.raises(SettingError) as in_engine:  # the clipping DeepSpeed's optimizer resolved
        clip_once(1.0, 1.0, engine="DeepSpeedZeroOptimizer")
    message = str(in_engine.value)
    assert message.startswith("gradient_clipping must be 0 in the DeepSpeed config when the LAMB pre-normalises")
    assert message.endswith(
        "(DeepSpeed DeepSpeedZeroOptimizer; its default is 1.0 when the config has no gradient_clipping)"
    )
