"""Gradient accumulation and the loss: gradients come out as the mean over the accumulated batch.

transformers 5 passes ``num_items_in_batch`` to every model whose ``forward`` takes ``**kwargs`` and then does not
divide by the accumulation steps. ``BertForMaskedLM`` takes ``**kwargs`` but averages its own loss, so a plain
Trainer gets gradients ``gradient_accumulation_steps`` times too large; ``LlamaForCausalLM`` really normalises by
the item count. The reference gradient here is written out: one backward of the whole batch's mean token loss.
"""

from __future__ import annotations

import copy
import logging

import datasets
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback

from legw_hf import LegwTrainer, LegwTrainingArguments

VOCAB, LENGTH, EXAMPLES = 40, 8, 8


class FirstGradients(TrainerCallback):
    """The gradients the first optimizer step sees (after accumulation, before the step)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = {name: p.grad.detach().clone() for name, p in self.model.named_parameters()}


def tiny_bert() -> BertForMaskedLM:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=LENGTH,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForMaskedLM(config)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=LENGTH,
    )
    return LlamaForCausalLM(config)


def token_dataset(labelled_per_example) -> datasets.Dataset:
    """Random tokens; example i has labels on its first ``labelled_per_example(i)`` positions only."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (EXAMPLES, LENGTH), generator=generator)
    labels = torch.full_like(ids, -100)
    for i in range(EXAMPLES):
        labels[i, : labelled_per_example(i)] = ids[i, : labelled_per_example(i)]
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()}).with_format("torch")


def whole_batch_gradients(model: torch.nn.Module, data: datasets.Dataset) -> dict[str, torch.Tensor]:
    """The gradient of the mean token loss over the whole (accumulated) batch, in one forward and backward."""
    model, batch = copy.deepcopy(model), data[:]
    model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


def first_step_gradients(trainer_cls, model, data, tmp_path) -> tuple[Trainer, dict[str, torch.Tensor]]:
    args = LegwTrainingArguments(
        output_dir=str(tmp_path / trainer_cls.__name__),
        per_device_train_batch_size=EXAMPLES // 2,
        gradient_accumulation_steps=2,  # the whole dataset is one update
        max_steps=1,
        learning_rate=0.1,
        legw_optimizer="sgd",
        legw_momentum=0.0,
        max_grad_norm=0.0,
        save_strategy="no",
        report_to="none",
        log_level="warning",  # the warnings checked here, whatever verbosity another test left transformers at
        use_cpu=True,
        disable_tqdm=True,
    )
    capture = FirstGradients(model)
    trainer = trainer_cls(model=model, args=args, train_dataset=data, callbacks=[capture])
    trainer.train()
    return trainer, capture.grads


def assert_gradients(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], scale: float = 1.0) -> None:
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], scale * grad, rtol=1e-4, atol=1e-7, msg=name)


def test_bert_gradients_are_the_batch_mean_under_accumulation(tmp_path, caplog):
    # equal labelled tokens per example, so the mean of the micro-batch means is the whole batch's mean
    data = token_dataset(lambda i: 3)
    model = tiny_bert()
    expected = whole_batch_gradients(model, data)

    _, plain = first_step_gradients(Trainer, copy.deepcopy(model), data, tmp_path)
    assert_gradients(plain, expected, scale=2.0)  # the upstream behaviour this fixes: 2 = accumulation steps

    with caplog.at_level(logging.WARNING, logger="legw_hf"):
        trainer, grads = first_step_gradients(LegwTrainer, model, data, tmp_path)
    assert_gradients(grads, expected)
    assert trainer.model_accepts_loss_kwargs is False
    (note,) = [r.getMessage() for r in caplog.records if "num_items_in_batch" in r.getMessage()]
    assert note.startswith("BertForMaskedLM.forward takes **kwargs, but its loss does not depend on")
    assert "would be 2 times too large" in note


def test_a_model_that_uses_num_items_in_batch_is_left_to_it(tmp_path, caplog):
    # unequal labelled tokens per example: only a count over the whole batch gives the batch's token mean
    data = token_dataset(lambda i: 2 + i % 5)
    model = tiny_llama()
    expected = whole_batch_gradients(model, data)
    with caplog.at_level(logging.WARNING, logger="legw_hf"):
        trainer, grads = first_step_gradients(LegwTrainer, model, data, tmp_path)
    assert trainer.model_accepts_loss_kwargs is True
    assert_gradients(grads, expected)
    assert not [r for r in caplog.records if "num_items_in_batch" in r.getMessage()]


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_the_check_leaves_the_training_run_unchanged(tmp_path, build):
    # the probe runs two extra forwards without gradients, in eval mode and on a forked RNG: a run whose
    # decision is already made by hand must train to the same weights, bit for bit
    data = token_dataset(lambda i: 3)
    probed = build()
    by_hand = copy.deepcopy(probed)
    by_hand.accepts_loss_kwargs = isinstance(by_hand, LlamaForCausalLM)
    first_step_gradients(LegwTrainer, probed, data, tmp_path / "probed")
    first_step_gradients(LegwTrainer, by_hand, data, tmp_path / "by_hand")
    for a, b in zip(probed.parameters(), by_hand.parameters(), strict=True):
        assert torch.equal(a, b)
