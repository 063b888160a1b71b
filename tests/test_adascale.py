"""AdaScale and the gradient noise scale: estimators against known noise, Trainer runs, fp16 overflows, resume.

References are written out here: the noise of a quadratic whose per-sample gradients are Gaussian with known mean
and covariance, the paper's formulas (Johnson et al. 2020, §3; McCandlish et al. 2018) applied to micro-batch
gradients computed separately from the training step, and the base run's LR schedule as a formula.
"""

from __future__ import annotations

import copy
import json
import logging
import math

import datasets
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from launch import launch
from legw_oracle import legw_lr
from procs import REPO
from test_trainer import PoisonSteps
from torch.utils.data import DataLoader, TensorDataset
from toy import Regressor, StopAt, legw_training_args, regression_dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from legw_hf import LegwConfig, LegwTrainer, LegwTrainingArguments, SettingError
from legw_hf.adascale import GradientStatistics
from legw_hf.integrations.accelerate import create_adascale
from legw_hf.integrations.trainer import NOISE_STATE_FILE
from legw_hf.noise_scale import GradientNoise

# ---------------------------------------------------------------------------------------------------------------
# The estimators on a problem with known gradient noise


class NoisyQuadratic(torch.nn.Module):
    """Per-sample loss ½‖w − y‖²: the per-sample gradient is w − y, so with y ~ N(m, diag(s²)) the true gradient is
    w − m and the per-sample covariance diag(s²)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((self.w - y) ** 2).sum(dim=-1)  # per-sample losses


def test_estimators_are_unbiased_on_gaussian_gradients():
    dim, micro, steps, updates = 6, 4, 4, 1500
    generator = torch.Generator().manual_seed(0)
    mean, std = torch.linspace(-1.0, 1.0, dim), torch.linspace(0.5, 2.0, dim)
    trace, signal = float((std**2).sum()), float((mean**2).sum())  # w = 0: G = -m
    model = NoisyQuadratic(dim)
    noise = GradientNoise(micro_batch=micro, base_batch=micro, global_batch=micro * steps)
    statistics = GradientStatistics(model.parameters(), noise).attach()
    traces, signals, gains = [], [], []
    for _ in range(updates):
        for _ in range(steps):
            y = mean + std * torch.randn(micro, dim, generator=generator)
            (model(y).mean() / steps).backward()  # a mean loss divided by the accumulation, as accelerate does
            statistics.micro_step_done(1 / steps)
        assert statistics.update_done()
        model.zero_grad()
        traces.append(noise.last["trace"])
        signals.append(noise.last["signal"])
        gains.append(noise.gain)
    statistics.detach()
    traces, signals = torch.tensor(traces, dtype=torch.float64), torch.tensor(signals, dtype=torch.float64)
    for estimates, truth in ((traces, trace), (signals, signal)):
        standard_error = float(estimates.std()) / math.sqrt(updates)
        assert abs(float(estimates.mean()) - truth) < 4 * standard_error, (float(estimates.mean()), truth)
    assert all(1.0 <= r <= steps for r in gains)
    assert noise.b_simple == pytest.approx(trace / signal, rel=0.1)  # EMAs over the last ~1/(1 - θ) updates


def test_item_weighted_estimator_is_unbiased_for_unequal_micro_batches():
    # Micro-batches of 1, 2, 3 and 6 samples, each gradient the mean of its samples, combined in proportion to their
    # sizes (Trainer's num_items_in_batch): the per-sample noise and the signal are still estimated without bias.
    dim, sizes, updates = 5, (1, 2, 3, 6), 2000
    generator = torch.Generator().manual_seed(1)
    mean, std = torch.full((dim,), 0.7), torch.linspace(0.5, 1.5, dim)
    trace, signal = float((std**2).sum()), float((mean**2).sum())
    model = NoisyQuadratic(dim)
    total = sum(sizes)
    noise = GradientNoise(micro_batch=total // len(sizes), base_batch=1, global_batch=total)
    statistics = GradientStatistics(model.parameters(), noise).attach()
    traces, signals = [], []
    for _ in range(updates):
        for size in sizes:
            y = mean + std * torch.randn(size, dim, generator=generator)
            (model(y).sum() / total).backward()  # a partial sum over the whole batch's items
            statistics.micro_step_done(size / total)
        statistics.update_done()
        model.zero_grad()
        traces.append(noise.last["trace"])  # σ̂²_b of the mean micro-batch (3 samples) × 3: per sample
        signals.append(noise.last["signal"])
    statistics.detach()
    traces, signals = torch.tensor(traces, dtype=torch.float64), torch.tensor(signals, dtype=torch.float64)
    for estimates, truth in ((traces, trace), (signals, signal)):
        standard_error = float(estimates.std()) / math.sqrt(updates)
        assert abs(float(estimates.mean()) - truth) < 4 * standard_error, (float(estimates.mean()), truth)


def test_sqrt_gain_statistics_are_those_of_the_gradients_divided_by_sqrt_v_plus_eps():
    # Two micro-batches of one update, under an Adam whose second moments v and eps are set here: the statistics
    # must be those of g / (sqrt(v) + eps), written out below, not of the raw gradients.
    model = NoisyQuadratic(3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, eps=1e-3)
    v = torch.tensor([4.0, 0.25, 1e-6])
    optimizer.state[model.w]["exp_avg_sq"] = v.clone()
    noise = GradientNoise(micro_batch=1, base_batch=1, global_batch=2)
    statistics = GradientStatistics(model.parameters(), noise, preconditioner=optimizer).attach()
    gradients = []
    for y in (torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[3.0, -1.0, 1.0]])):
        before = model.w.grad.clone() if model.w.grad is not None else torch.zeros(3)
        (model(y).sum() / 2).backward()
        gradients.append(2 * (model.w.grad - before))  # this micro-batch's own mean gradient
        statistics.micro_step_done(0.5)
    statistics.update_done()
    statistics.detach()
    preconditioned = [g / (v.sqrt() + 1e-3) for g in gradients]
    reference = GradientNoise(micro_batch=1, base_batch=1, global_batch=2)
    reference.observe(*written_out_measurements(preconditioned, [0.5, 0.5]), 2)
    assert noise.last["trace"] == pytest.approx(reference.last["trace"], rel=1e-5)
    assert noise.last["signal"] == pytest.approx(reference.last["signal"], rel=1e-5)
    raw = GradientNoise(micro_batch=1, base_batch=1, global_batch=2)
    raw.observe(*written_out_measurements(gradients, [0.5, 0.5]), 2)
    assert noise.last["trace"] != pytest.approx(raw.last["trace"], rel=0.1)  # the preconditioning changed it


def test_gain_and_moving_averages_follow_the_paper():
    noise = GradientNoise(micro_batch=2, base_batch=4, global_batch=64)  # S = 16, θ = 0.984
    scale, theta = 16.0, 1 - 16 / 1000
    observations = [(40.0, 1.5, 8), (25.0, 1.2, 8), (30.0, 0.1, 8), (90.0, 3.0, 8)] * 20
    sigma_ema = mu_ema = None
    for t, (sum_sq, mean_sq, count) in enumerate(observations):
        noise.observe(sum_sq, mean_sq, count)
        sigma = max((sum_sq - count * mean_sq) / (count - 1), 1e-6)
        mu = max(mean_sq - sigma / count, 0.0)
        weight = 1 / (t + 1) if t < 1 / (1 - theta) else 1 - theta
        sigma_ema = sigma if sigma_ema is None else (1 - weight) * sigma_ema + weight * sigma
        mu_ema = mu if mu_ema is None else (1 - weight) * mu_ema + weight * mu
        base_variance = sigma_ema * 2 / 4  # per-sample trace / base batch
        expected = (base_variance + mu_ema) / (base_variance / scale + mu_ema)
        assert noise.gain == pytest.approx(expected, rel=1e-12)
        assert 1 <= noise.gain <= scale
        assert noise.b_simple == pytest.approx(sigma_ema * 2 / mu_ema, rel=1e-12)
        assert noise.efficiency == pytest.approx(expected / scale, rel=1e-12)


def test_one_estimate_per_update_uses_consecutive_gradients_and_says_it_is_biased():
    model = NoisyQuadratic(3)
    noise = GradientNoise(micro_batch=8, base_batch=8, global_batch=8)
    statistics = GradientStatistics(model.parameters(), noise).attach()
    targets = [torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[3.0, -1.0, 1.0]])]
    gradients = []
    for y in targets:
        model(y).mean().backward()
        gradients.append(model.w.grad.clone())
        statistics.micro_step_done(1.0)
        recorded = statistics.update_done()
        model.zero_grad()
    statistics.detach()
    assert recorded and noise.recorded == 1 and noise.biased
    assert noise.gain == 1.0  # S = 1: nothing to gain
    a, b = gradients
    variance = float(((a - b) ** 2).sum() / 2)  # two estimates: (‖a‖² + ‖b‖² − 2‖(a+b)/2‖²) / 1
    assert noise.last["trace"] == pytest.approx(8 * variance, rel=1e-6)
    assert noise.last["signal"] == pytest.approx(float(((a + b) / 2).square().sum()) - variance / 2, rel=1e-6)
    assert noise.summary()["noise_scale/biased"] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Trainer


class RecordingTrainer(LegwTrainer):
    """Keeps the first update's micro-batches and the model as it was before that update."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == 0:
            if not hasattr(self, "first_inputs"):
                self.first_inputs, self.initial_model = [], copy.deepcopy(self.accelerator.unwrap_model(model))
            self.first_inputs.append({k: v.clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def flat_gradient(model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, allow_unused=False)])


def written_out_measurements(gradients: list[torch.Tensor], weights: list[float]) -> tuple[float, float]:
    """Σ a_i‖g_i‖² and ‖ḡ‖² of the module doc written out: a_i = S·w_i, ḡ = Σ w_i g_i (w normalised)."""
    g = torch.stack(gradients).double()
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    applied = (w[:, None] * g).sum(0)
    return float((len(gradients) * w * g.square().sum(1)).sum()), float(applied.square().sum())


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=8,
    )
    return LlamaForCausalLM(config)


def uneven_token_dataset() -> datasets.Dataset:
    """Random tokens where example i has labels on its first 2 + (i mod 6) positions only."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 40, (8, 8), generator=generator)
    labels = torch.full_like(ids, -100)
    for i in range(8):
        labels[i, : 2 + i % 6] = ids[i, : 2 + i % 6]
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()}).with_format("torch")


def test_trainer_statistics_match_micro_batch_gradients_with_num_items_in_batch(tmp_path):
    # LlamaForCausalLM normalises its loss by num_items_in_batch: each micro-batch's gradient is a partial sum, and
    # its weight in the applied gradient is its share of the batch's (shifted) labels.
    model = tiny_llama()
    args = LegwTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_steps=1,
        learning_rate=0.01,
        legw_adascale="diagnostics",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = RecordingTrainer(model=model, args=args, train_dataset=uneven_token_dataset())
    trainer.train()
    reference = trainer.initial_model
    gradients, items = [], []
    for inputs in trainer.first_inputs:
        outputs = reference(input_ids=inputs["input_ids"], labels=inputs["labels"])  # the micro-batch's mean loss
        gradients.append(flat_gradient(reference, outputs.loss))
        items.append(int(inputs["labels"][:, 1:].ne(-100).sum()))
    assert len(set(items)) > 1  # the micro-batches really are unequal
    square_norms, applied = written_out_measurements(gradients, items)
    last = trainer.legw_noise.last
    assert last["estimates"] == 4
    assert last["weighted_square_norms"] == pytest.approx(square_norms, rel=1e-4)
    assert last["applied_square_norm"] == pytest.approx(applied, rel=1e-4)
    # Weighting by items matters here: the unweighted mean gradient is another vector.
    assert written_out_measurements(gradients, [1.0] * 4)[1] != pytest.approx(applied, rel=1e-2)


def test_trainer_statistics_match_micro_batch_gradients_with_mean_losses(tmp_path):
    args = legw_training_args(
        tmp_path,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=3,
        max_steps=1,
        legw_base_batch_size=None,
        legw_base_warmup_epochs=None,
        legw_adascale="diagnostics",
    )
    trainer = RecordingTrainer(model=Regressor(), args=args, train_dataset=regression_dataset(48))
    trainer.train()
    reference = trainer.initial_model
    gradients = [flat_gradient(reference, reference(**inputs)["loss"]) for inputs in trainer.first_inputs]
    square_norms, applied = written_out_measurements(gradients, [1.0] * len(gradients))
    assert len(gradients) == 3
    last = trainer.legw_noise.last
    assert last["weighted_square_norms"] == pytest.approx(square_norms, rel=1e-5)
    assert last["applied_square_norm"] == pytest.approx(applied, rel=1e-5)
    variance = (square_norms - 3 * applied) / 2  # the paper's σ̂² of one micro-batch of 4
    assert last["trace"] == pytest.approx(4 * variance, rel=1e-4)
    assert last["signal"] == pytest.approx(max(applied - variance / 3, 0.0), rel=1e-4, abs=1e-9)


def adascale_args(output_dir, **overrides) -> LegwTrainingArguments:
    """AdaScale over a base run at batch 4 (LR 0.05, warmup 0.1 epochs, linear decay, 2 epochs); this run has
    per-device 4 × accumulation 4 = 16 (S = 4)."""
    settings = dict(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
        num_train_epochs=2,
        legw_adascale="gain",
        legw_optimizer="sgd",
        max_grad_norm=0.0,
    )
    return legw_training_args(output_dir, **(settings | overrides))


def base_run_lr(progress: float, *, steps_per_epoch: int, epochs: float = 2, peak=0.05, warmup=0.1) -> float:
    """The base run's LR at ``progress`` base-run updates (k = 1): linear warmup to ``peak`` over ``warmup`` epochs,
    then a linear decay to 0 at ``epochs``."""
    epoch = progress / steps_per_epoch
    return legw_lr(epoch, base_lr=peak, k=1, base_warmup_epochs=warmup, epochs=epochs)


class EveryUpdate(TrainerCallback):
    """(LR used, gain, progress before, progress after, recorded) of every optimizer step, skipped ones too."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self._before = None

    def on_pre_optimizer_step(self, args, state, control, lr_scheduler=None, optimizer=None, **kwargs):
        self._before = {
            "lr": optimizer.param_groups[0]["lr"],
            "gain": lr_scheduler.gain,
            "progress": lr_scheduler.progress,
            "recorded": lr_scheduler.noise.recorded,
            "trace": lr_scheduler.noise.trace,
        }

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        self.rows.append(self._before | {"progress_after": lr_scheduler.progress})


def test_adascale_run_ends_at_the_base_run_length_with_the_written_out_lr(tmp_path):
    data = regression_dataset(100)
    updates = EveryUpdate()
    trainer = LegwTrainer(model=Regressor(), args=adascale_args(tmp_path), train_dataset=data, callbacks=[updates])
    trainer.train()
    base_updates = 2 * 25  # 2 epochs of 100 samples at batch 4
    rows = updates.rows
    assert rows[-1]["progress_after"] >= base_updates > rows[-1]["progress"]
    assert trainer.lr_scheduler.finished and trainer.state.global_step == len(rows) < base_updates
    for row in rows:
        assert 1.0 <= row["gain"] <= 4.0
        assert row["progress_after"] == pytest.approx(row["progress"] + row["gain"], rel=1e-12)
        expected = row["gain"] * base_run_lr(row["progress"] + row["gain"], steps_per_epoch=25)
        assert row["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert max(row["gain"] for row in rows) > 1.5  # the noise is real: r moves well away from 1
    logs = [entry for entry in trainer.state.log_history if "adascale/gain" in entry]
    assert len(logs) == len(rows) and {"noise_scale/b_simple", "adascale/efficiency"} <= set(logs[-1])


def test_fp16_overflow_leaves_statistics_and_progress_unchanged(tmp_path):
    poisoned = {2, 4}  # not 6, the epoch's short last update (one micro-batch), which records nothing anyway
    runs = {}
    for fp16 in (False, True):
        model, updates = Regressor(), EveryUpdate()
        args = adascale_args(tmp_path / str(fp16), fp16=fp16, num_train_epochs=1)
        callbacks = [updates, PoisonSteps(model, poisoned if fp16 else set())]
        trainer = LegwTrainer(model=model, args=args, train_dataset=regression_dataset(100), callbacks=callbacks)
        if fp16:  # accelerate makes no GradScaler on CPU; install the real one a GPU fp16 run uses
            trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        trainer.train()
        runs[fp16] = updates.rows
    clean, scaled = runs[False], runs[True]
    recorded = [row["recorded"] for row in scaled]
    progress = [row["progress_after"] for row in scaled]
    for step in poisoned:
        # The overflowed update records nothing and does not advance τ.
        assert progress[step] == progress[step - 1] and scaled[step + 1]["progress"] == progress[step - 1]
        assert recorded[step] == recorded[step - 1] and recorded[step + 1] == recorded[step] + 1
    # Unscaled: the first update (before any overflow) measures the same gradients as the run without a scaler.
    assert scaled[0]["trace"] == pytest.approx(clean[0]["trace"], rel=1e-3)
    assert scaled[0]["gain"] == pytest.approx(clean[0]["gain"], rel=1e-3)


def test_interrupted_and_resumed_adascale_run_equals_uninterrupted(tmp_path, caplog):
    data = regression_dataset(100)
    full = LegwTrainer(model=Regressor(), args=adascale_args(tmp_path / "full"), train_dataset=data)
    full.train()
    args = adascale_args(tmp_path / "resumed", save_strategy="steps", save_steps=1000)
    LegwTrainer(model=Regressor(), args=args, train_dataset=data, callbacks=[StopAt(7)]).train()
    checkpoint = tmp_path / "resumed" / "checkpoint-7"
    saved = json.loads((checkpoint / NOISE_STATE_FILE).read_text())
    assert saved["recorded"] == 6  # update 7 is the epoch's last, of one micro-batch: too few estimates

    resumed = LegwTrainer(model=Regressor(), args=args, train_dataset=data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.lr_scheduler.progress == full.lr_scheduler.progress
    assert resumed.state.global_step == full.state.global_step
    assert resumed.legw_noise.state_dict() == full.legw_noise.state_dict()
    for expected, actual in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)

    # Without the statistics file the run warns, re-estimates and still ends at the base run's length.
    (checkpoint / NOISE_STATE_FILE).unlink()
    again = LegwTrainer(model=Regressor(), args=adascale_args(tmp_path / "again"), train_dataset=data)
    with caplog.at_level(logging.WARNING, logger="legw_hf"):
        again.train(resume_from_checkpoint=str(checkpoint))
    assert "has no gradient noise state" in caplog.text
    # Counted afresh: only updates after the checkpoint (less the epochs' one-micro-batch last updates).
    assert again.lr_scheduler.finished and 0 < again.legw_noise.recorded <= again.state.global_step - 7 - 2


def test_diagnostics_warn_once_when_the_batch_is_far_above_b_simple(tmp_path, caplog):
    # Every sample is the same: the gradient noise is nil, so B_simple is far below any batch.
    x = torch.ones(64, 8)
    data = datasets.Dataset.from_dict({"x": x.tolist(), "y": [0.5] * 64}).with_format("torch")
    args = legw_training_args(
        tmp_path,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        legw_adascale="diagnostics",
        num_train_epochs=4,
    )
    trainer = LegwTrainer(model=Regressor(), args=args, train_dataset=data)
    with caplog.at_level(logging.WARNING, logger="legw_hf"):
        trainer.train()
    assert caplog.text.count("the gradient noise scale B_simple") == 1
    logged = [entry for entry in trainer.state.log_history if "noise_scale/b_simple" in entry]
    assert logged and logged[-1]["noise_scale/b_simple"] < 1.6  # 16 / 10
    # Diagnostics leave the LEGW schedule alone.
    assert all("legw_k" in entry for entry in logged)


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        (dict(legw_base_batch_size=None, legw_base_warmup_epochs=None), "legw_base_batch_size", "is required by"),
        (dict(legw_rule="legw"), "legw_rule", "choose one"),
        (dict(max_steps=10), "max_steps", "base run's length"),
        (dict(legw_adascale_scale=8), "legw_adascale_scale", "must equal global batch / base batch = 16 / 4 = 4"),
        (dict(legw_adascale="diagnostics", legw_adascale_scale=4), "legw_adascale_scale", "only used with"),
        (dict(legw_adascale="sqrt_gain"), "legw_adascale", "Adam-family"),
        (dict(legw_base_batch_size=32), "legw_base_batch_size", "must not exceed the global batch (16)"),
    ],
)
def test_bad_adascale_settings_name_the_field(tmp_path, overrides, field, message):
    with pytest.raises(SettingError) as raised:
        adascale_args(tmp_path, **overrides)
    assert raised.value.field == field and message in str(raised.value)
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(fp16=True), "fp16 loss scaling"),
        (dict(legw_adascale="sqrt_gain", legw_optimizer="lamb"), "sqrt_gain is not supported under DeepSpeed"),
        (dict(per_device_train_batch_size=16, gradient_accumulation_steps=1), "at least 2 gradient estimates"),
    ],
)
def test_what_deepspeed_cannot_measure_is_refused(tmp_path, overrides, message):
    config = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}
    with pytest.raises(SettingError, match=message) as raised:
        adascale_args(tmp_path, deepspeed=config, **overrides)
    assert raised.value.field == "legw_adascale"


def test_sqrt_gain_with_lamb_preconditions_by_the_second_moments(tmp_path):
    args = adascale_args(tmp_path, legw_adascale="sqrt_gain", legw_optimizer="lamb", num_train_epochs=1)
    updates = EveryUpdate()
    trainer = LegwTrainer(model=Regressor(), args=args, train_dataset=regression_dataset(100), callbacks=[updates])
    trainer.train()
    for row in updates.rows:
        expected = math.sqrt(row["gain"]) * base_run_lr(row["progress"] + row["gain"], steps_per_epoch=25, epochs=1)
        assert row["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert trainer.lr_scheduler.finished


# ---------------------------------------------------------------------------------------------------------------
# accelerate


@pytest.fixture
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def prepared_loop(accumulation: int = 2):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(
        TensorDataset(torch.randn(64, 4, generator=generator), torch.randn(64, generator=generator)), batch_size=4
    )
    return (accelerator, *accelerator.prepare(model, optimizer, loader))


def test_accelerate_refuses_what_cannot_run(fresh_accelerate_state):
    accelerator, model, optimizer, loader = prepared_loop()
    base = LegwConfig(base_batch_size=4, base_lr=0.1, base_warmup_epochs=0.1, rule="none")
    with pytest.raises(SettingError, match="AdaScale replaces the LEGW scaling rule") as raised:
        create_adascale(
            accelerator,
            optimizer,
            model,
            loader,
            config=LegwConfig(base_batch_size=4, base_lr=0.1, base_warmup_epochs=0.1),
            num_epochs=1,
        )
    assert raised.value.field == "rule"
    step_schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3)
    with pytest.raises(SettingError, match="fractional progress") as raised:
        create_adascale(accelerator, optimizer, model, loader, schedule=step_schedule, base_batch_size=4, base_steps=16)
    assert raised.value.field == "schedule"
    with pytest.raises(SettingError, match="fractional progress"):
        create_adascale(
            accelerator,
            optimizer,
            model,
            loader,
            schedule=lambda step: [0.1, 0.01][step],
            base_batch_size=4,
            base_steps=16,
        )
    with pytest.raises(SettingError, match="must equal global batch / base batch = 8 / 4 = 2") as raised:
        create_adascale(accelerator, optimizer, model, loader, config=base, num_epochs=1, scale=4)
    assert raised.value.field == "scale"


def test_accelerate_save_and_load_state_resume_exactly(fresh_accelerate_state, tmp_path):
    base = LegwConfig(base_batch_size=4, base_lr=0.1, base_warmup_epochs=0.1, rule="none")

    def run(stop_after=None, resume=None):
        AcceleratorState._reset_state(True)
        torch.manual_seed(0)
        accelerator, model, optimizer, loader = prepared_loop()
        adascale = create_adascale(accelerator, optimizer, model, loader, config=base, num_epochs=2)
        if resume:
            accelerator.load_state(resume)
        updates = adascale.scheduler.updates
        while not adascale.finished:
            batches = accelerator.skip_first_batches(loader, updates % 8 * 2) if updates % 8 else loader
            for x, y in batches:
                with accelerator.accumulate(model):
                    adascale.backward(torch.nn.functional.mse_loss(model(x).squeeze(-1), y))
                    optimizer.step()
                    adascale.step()
                    optimizer.zero_grad()
                if accelerator.sync_gradients:
                    updates += 1
                    if updates == stop_after:
                        accelerator.save_state(str(tmp_path / "state"))
                        return adascale, model
                if adascale.finished:
                    break
        return adascale, model

    full, full_model = run()
    run(stop_after=5)
    resumed, resumed_model = run(resume=str(tmp_path / "state"))
    assert resumed.progress == full.progress and resumed.noise.state_dict() == full.noise.state_dict()
    torch.testing.assert_close(resumed_model.weight, full_model.weight, rtol=0, atol=0)
    assert full.finished and full.progress >= 2 * 16


@pytest.mark.multiprocess
def test_two_process_accelerate_statistics_equal_those_of_the_same_gradients_in_one_process(tmp_path):
    # 2 gloo processes × 2 accumulation steps of 8: S = 4 estimates per update (scale 4 over the base batch 8).
    loop = "--base-batch-size 8 --per-device-batch-size 8 --gradient-accumulation-steps 2 --epochs 2 --dataset-size 256"
    outputs = ["--stats-log", tmp_path / "stats", "--gradients-out", tmp_path / "gradients"]
    launch("accelerate", REPO / "examples" / "adascale_loop.py", *loop.split(), *outputs, cwd=tmp_path, timeout=300)
    rows = [[json.loads(line) for line in (tmp_path / f"stats.rank{r}").read_text().splitlines()] for r in (0, 1)]
    assert rows[0] == rows[1]  # every process holds the same statistics, gain, progress and LR
    gradients = [torch.load(tmp_path / f"gradients.rank{r}") for r in (0, 1)]
    for row, *micro in zip(rows[0], *gradients, strict=True):
        square_norms, applied = written_out_measurements([*micro[0], *micro[1]], [1.0] * 4)
        assert row["estimates"] == 4
        assert row["weighted_square_norms"] == pytest.approx(square_norms, rel=1e-5)
        assert row["applied_square_norm"] == pytest.approx(applied, rel=1e-5)
        # The LR: the gain times the base run's (batch 8, 256 samples: 32 updates per epoch) at the progress reached.
        expected = row["gain"] * base_run_lr(row["progress"] + row["gain"], steps_per_epoch=32, warmup=0.25)
        assert row["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    last = rows[0][-1]
    assert last["progress"] < 64 <= last["progress"] + last["gain"]  # ends at the base run's 2 epochs
    assert len(rows[0]) < 64 / 1.5


@pytest.mark.multiprocess
def test_adascale_under_deepspeed_zero_measures_what_ddp_measures(tmp_path):
    # The same run (2 processes x per-device 4 x accumulation 2, SGD, AdaScale gain) under DDP and under ZeRO 2, 3:
    # under ZeRO the applied gradient's norm is DeepSpeed's own, read in the client optimizer's step pre-hook.
    launch("deepspeed", REPO / "tests" / "scripts" / "adascale_trainer.py", tmp_path, timeout=600)
    records = {}
    for stage in ("ddp", "2", "3"):
        records[stage] = [json.loads((tmp_path / stage / f"rank{r}.json").read_text()) for r in (0, 1)]
    reference = records["ddp"][0]
    assert reference["world_size"] == 2 and reference["finished"]
    assert all(row["estimates"] == 4 for row in reference["rows"])
    for stage, ranks in records.items():
        for record in ranks:
            assert record["finished"] and len(record["rows"]) == len(reference["rows"]), stage
            for row, expected in zip(record["rows"], reference["rows"], strict=True):
                for key in ("estimates", "weighted_square_norms", "applied_square_norm", "gain", "progress"):
                    assert row[key] == pytest.approx(expected[key], rel=1e-5), (stage, key)
            actual, expected = torch.tensor(record["params"]), torch.tensor(reference["params"])
            assert float((actual - expected).norm() / expected.norm()) < 1e-5, stage


@pytest.mark.parametrize("mode", ["gain", "diagnostics"])
def test_the_pretraining_program_refuses_adascale(tmp_path, mode):
    from legw_hf.pretraining.program import parse

    with pytest.raises(SettingError, match="not offered by the pretraining program") as raised:
        parse(["--output_dir", str(tmp_path / "run"), "--legw_adascale", mode])
    assert raised.value.field == "legw_adascale" and not (tmp_path / "run").exists()


@pytest.mark.multiprocess
def test_accelerate_loop_under_a_deepspeed_plugin_measures_what_the_plain_loop_measures(tmp_path):
    # accelerate's DeepSpeed plugin counts one process on CPU-only machines (see test_accelerate), so: one process,
    # 4 accumulation steps of 8 (S = 4), ZeRO-2, against the same loop without DeepSpeed.
    config = tmp_path / "ds.json"
    config.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 2},
                "gradient_clipping": 0.0,
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "train_batch_size": "auto",
            }
        )
    )
    loop = ["--gradient-accumulation-steps", "4", "--epochs", "1"]
    with_deepspeed = dict(processes=1, launcher_args=["--use_deepspeed", "--deepspeed_config_file", str(config)])
    runs = {"ds": ("accelerate", with_deepspeed), "plain": ("python", {})}
    rows = {}
    for run, (launcher, settings) in runs.items():
        script = REPO / "examples" / "adascale_loop.py"
        launch(launcher, script, *loop, "--stats-log", tmp_path / run, cwd=tmp_path, timeout=300, **settings)
        rows[run] = [json.loads(line) for line in (tmp_path / f"{run}.rank0").read_text().splitlines()]
    assert len(rows["ds"]) == len(rows["plain"]) > 5
    for row, expected in zip(rows["ds"], rows["plain"], strict=True):
        assert row["estimates"] == 4
        for key in ("weighted_square_norms", "applied_square_norm", "gain", "progress", "lr"):
            assert row[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-12), key
