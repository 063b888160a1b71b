"""The pieces of ``legw-hf pretrain``, each against a rule written out here: BERT masking, packing, the cached
preprocessing, the local ``evaluate`` metric and the unigram baseline, the masked-positions head, carrying optimizer
moments into a new phase, the largest-batch search."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from legw_hf import Lamb, SettingError
from legw_hf.optim.phases import continue_from_phase
from legw_hf.pretraining.corpus import stdlib_docstrings
from legw_hf.pretraining.data import PreparedText, train_wordpiece
from legw_hf.pretraining.evaluation import (
    MaskedLmMetrics,
    UnigramBaseline,
    masked_lm_metric,
    masked_lm_metrics,
    token_scores,
)
from legw_hf.pretraining.largest_batch import fit_micro_batch, largest_fitting
from legw_hf.pretraining.masking import IGNORED_LABEL, MaskingCollator, MaskingRule, mask_sequences
from legw_hf.pretraining.model import BertForMaskedPositions


@pytest.fixture(scope="module")
def documents() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": stdlib_docstrings()[:300]})


@pytest.fixture(scope="module")
def tokenizer(documents, tmp_path_factory):
    return train_wordpiece(documents, 600, tmp_path_factory.mktemp("wordpiece"))


def words_of(ids: list[int], tokenizer) -> list[list[int]]:
    """Positions of each word, the BERT way: a ``##`` piece joins the word before it; specials are no word."""
    tokens = tokenizer.convert_ids_to_tokens(ids)
    words: list[list[int]] = []
    previous_special = True
    for position, token in enumerate(tokens):
        if token in ("[CLS]", "[SEP]", "[PAD]"):
            previous_special = True
            continue
        if token.startswith("##") and not previous_special:
            words[-1].append(position)
        else:
            words.append([position])
        previous_special = False
    return words


# ------------------------------------------------------------------------------------------------------ masking
def test_masking_predicts_the_bert_count_of_whole_words_and_never_a_special(documents, tokenizer):
    rule = MaskingRule(probability=0.15, max_predictions=20, whole_word=True)
    collator = MaskingCollator(tokenizer, rule, seed=0)
    ids = tokenizer(list(documents["text"])[:64], add_special_tokens=False)["input_ids"]
    sequences = [[tokenizer.cls_token_id, *seq[:126], tokenizer.sep_token_id] for seq in ids if len(seq) >= 126]
    assert len(sequences) >= 10
    batch = collator([{"input_ids": s} for s in sequences])
    for original, masked, labels in zip(sequences, batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        predicted = [i for i, label in enumerate(labels) if label != IGNORED_LABEL]
        expected = min(20, max(1, round(len(original) * 0.15)))
        # Greedy word-by-word selection may stop short of the budget by less than one word, never exceed it.
        longest = max(len(w) for w in words_of(original, tokenizer))
        assert expected - longest < len(predicted) <= expected
        assert all(labels[i] == original[i] for i in predicted)
        assert all(original[i] not in tokenizer.all_special_ids for i in predicted)
        chosen = set(predicted)
        for word in words_of(original, tokenizer):  # whole words: all of a word's pieces, or none
            assert chosen.issuperset(word) or chosen.isdisjoint(word)
        unpredicted = [i for i in range(len(original)) if i not in chosen]
        assert all(masked[i] == original[i] for i in unpredicted)


def test_masking_replaces_80_percent_by_mask_10_by_random_tokens_and_keeps_10(tokenizer):
    rule = MaskingRule(probability=0.15, max_predictions=1000, whole_word=False)
    table = rule.continuation_table(tokenizer)
    rng = np.random.default_rng(1)
    ordinary = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    ids = np.array([tokenizer.cls_token_id, *rng.choice(ordinary, 4000), tokenizer.sep_token_id])
    outcomes = {"mask": 0, "same": 0, "other": 0}
    for draw in range(20):
        masked, labels = rule.mask(ids, table, tokenizer.mask_token_id, np.random.default_rng(draw))
        for position in np.flatnonzero(labels != IGNORED_LABEL):
            if masked[position] == tokenizer.mask_token_id:
                outcomes["mask"] += 1
            elif masked[position] == ids[position]:
                outcomes["same"] += 1  # kept, or a random draw that hit the same token (1/len(ordinary))
            else:
                assert masked[position] not in tokenizer.all_special_ids
                outcomes["other"] += 1
    total = sum(outcomes.values())
    assert total == 20 * round(len(ids) * 0.15)
    assert outcomes["mask"] / total == pytest.approx(0.8, abs=0.01)
    assert outcomes["same"] / total == pytest.approx(0.1, abs=0.01)
    assert outcomes["other"] / total == pytest.approx(0.1, abs=0.01)


def test_validation_masks_depend_only_on_the_seed_and_the_sequence_index(tokenizer):
    rule = MaskingRule(max_predictions=5)
    table = rule.continuation_table(tokenizer)
    sequences = [[tokenizer.cls_token_id, *range(10, 40)], [tokenizer.cls_token_id, *range(40, 70)]]
    mask_id = tokenizer.mask_token_id
    both = mask_sequences(sequences, [0, 1], rule, table, 7, mask_id)
    alone = mask_sequences(sequences[1:], [1], rule, table, 7, mask_id)
    assert both["labels"][1] == alone["labels"][0] and both["input_ids"][1] == alone["input_ids"][0]
    other_seed = mask_sequences(sequences, [0, 1], rule, table, 8, mask_id)
    assert other_seed["labels"] != both["labels"]


# ----------------------------------------------------------------------------------------- packing and caching
def test_packing_lays_documents_end_to_end_with_sep_and_cuts_cls_prefixed_sequences(documents, tokenizer, tmp_path):
    prepared = PreparedText(documents, tokenizer, split="train", max_document_tokens=None, cache_dir=tmp_path)
    packed = prepared.packed(32)
    stream = [
        t
        for ids in tokenizer(list(documents["text"]), add_special_tokens=False)["input_ids"]
        for t in (*ids, tokenizer.sep_token_id)
    ]
    assert len(packed) == len(stream) // 31  # one slice of <= 1000 documents here: one remainder dropped
    for index, sequence in enumerate(packed["input_ids"]):
        assert sequence[0] == tokenizer.cls_token_id and len(sequence) == 32
        assert sequence[1:] == stream[index * 31 : (index + 1) * 31]


def test_over_long_documents_are_dropped_once_and_the_results_are_reused_from_the_cache(documents, tokenizer, tmp_path):
    lengths = [len(ids) for ids in tokenizer(list(documents["text"]), add_special_tokens=False)["input_ids"]]
    limit = sorted(lengths)[len(lengths) // 2]
    first = PreparedText(documents, tokenizer, split="train", max_document_tokens=limit, cache_dir=tmp_path)
    assert len(first.kept) == sum(n <= limit for n in lengths) and first.dropped_documents == sum(
        n > limit for n in lengths
    )
    first.packed(64)
    assert first.reused == []
    files = sorted(first.cache_dir.glob("*.arrow"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    assert {f.name for f in files} == {"tokenized.arrow", "filtered.arrow", "packed-64.arrow"}

    again = PreparedText(documents, tokenizer, split="train", max_document_tokens=limit, cache_dir=tmp_path)
    assert again.packed(64)["input_ids"] == first.packed(64)["input_ids"]
    assert sorted(again.reused) == ["filtered", "packed-64", "tokenized"]
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # read, not rewritten

    other = PreparedText(documents, tokenizer, split="train", max_document_tokens=limit + 1, cache_dir=tmp_path)
    assert other.cache_dir != first.cache_dir and other.reused == []


# ---------------------------------------------------------------------------------------------------- metrics
def test_the_local_metric_module_scores_masked_tokens_like_cross_entropy_over_them():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.full((3, 7), IGNORED_LABEL)
    labels[0, 1], labels[1, 4], labels[2, 0], labels[2, 6] = 3, 5, 10, 0
    labels[0, 2] = logits[0, 2].argmax()  # one sure hit
    scored = labels != IGNORED_LABEL
    expected_loss = torch.nn.functional.cross_entropy(logits[scored], labels[scored]).item()
    expected_accuracy = (logits[scored].argmax(-1) == labels[scored]).float().mean().item()

    class Prediction:
        predictions = token_scores(logits, labels).numpy()
        label_ids = labels.numpy()

    metrics = masked_lm_metrics(Prediction())
    assert metrics["mlm_loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert metrics["accuracy"] == pytest.approx(expected_accuracy)
    assert metrics["perplexity"] == pytest.approx(math.exp(expected_loss), rel=1e-6)
    assert metrics["masked_tokens"] == 5
    assert type(masked_lm_metric()).__name__ == "MaskedLm"  # loaded from the package's file, not a hub


def test_the_unigram_baseline_is_the_add_one_frequency_of_each_masked_token_and_the_most_frequent_ones_hits():
    # Training text of 10 tokens over a vocabulary of 6 ids: id 2 five times, id 3 three times, id 4 twice.
    counts = np.array([0, 0, 5, 3, 2, 0])
    baseline = UnigramBaseline(counts)
    masked = np.array([2, 3, 3, 5])  # id 5 never occurs in training: add-one keeps its loss finite
    p = {2: 6 / 16, 3: 4 / 16, 5: 1 / 16}  # (count + 1) / (10 tokens + 6 ids)
    expected_loss = -(math.log(p[2]) + 2 * math.log(p[3]) + math.log(p[5])) / 4
    metrics = baseline.metrics(masked)
    assert metrics["unigram_loss"] == pytest.approx(expected_loss, rel=1e-12)
    assert metrics["unigram_perplexity"] == pytest.approx(math.exp(expected_loss), rel=1e-12)
    assert metrics["most_frequent_accuracy"] == pytest.approx(1 / 4)  # always id 2: one hit in four

    # Beside a model's scores, on the same masked tokens: the margin is the baseline's loss minus the model's.
    labels = np.full((2, 3), IGNORED_LABEL)
    labels[0, 0], labels[0, 2], labels[1, 1], labels[1, 2] = masked
    scores = np.zeros((2, 3, 2))
    scores[..., 0] = 3  # the model always predicts id 3: two hits
    scores[..., 1] = 0.5  # and gives every masked token -log p = 0.5

    class Prediction:
        predictions = scores
        label_ids = labels

    metrics = MaskedLmMetrics(baseline)(Prediction())
    assert metrics["mlm_loss"] == pytest.approx(0.5) and metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["unigram_loss"] == pytest.approx(expected_loss, rel=1e-12)
    assert metrics["below_unigram"] == pytest.approx(expected_loss - 0.5, rel=1e-12)


def test_token_counts_are_those_of_the_kept_documents(documents, tokenizer, tmp_path):
    prepared = PreparedText(documents, tokenizer, split="train", max_document_tokens=None, cache_dir=tmp_path)
    expected = np.zeros(len(tokenizer), dtype=np.int64)
    for ids in tokenizer(list(documents["text"]), add_special_tokens=False)["input_ids"]:
        for token in ids:
            expected[token] += 1
    assert np.array_equal(prepared.token_counts(len(tokenizer)), expected)
    assert expected[tokenizer.all_special_ids].sum() == expected[tokenizer.unk_token_id]  # no [CLS]/[SEP]/[PAD]


def test_the_masked_positions_head_trains_exactly_as_bert_for_masked_lm():
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = BertForMaskedLM(config).train()
    gathered = BertForMaskedPositions(config).train()
    gathered.load_state_dict(reference.state_dict())
    ids = torch.randint(5, 50, (3, 12))
    labels = torch.full_like(ids, IGNORED_LABEL)
    labels[0, 3], labels[1, 0], labels[1, 7], labels[2, 11] = 7, 9, 11, 13
    expected = reference(input_ids=ids, labels=labels).loss
    got = gathered(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(4))
    assert got.logits.shape == (4, 50)  # the labelled positions only
    assert got.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    expected.backward()
    got.loss.backward()
    for (name, a), b in zip(reference.named_parameters(), gathered.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name
    # Evaluation scores every position, as BertForMaskedLM does.
    gathered.eval()
    assert gathered(input_ids=ids, labels=labels).logits.shape == (3, 12, 50)


# ------------------------------------------------------------------------------------- phase 2's optimizer start
def test_a_new_phase_keeps_the_moments_restarts_the_step_count_and_keeps_its_own_lr():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    old = Lamb(model.parameters(), lr=1e-2, preset="nvidia")
    for _ in range(3):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        old.step()
        old.zero_grad()
    saved = old.state_dict()
    new = Lamb(model.parameters(), lr=5e-3, preset="nvidia")
    assert continue_from_phase(new, saved) == 2
    beta1, beta2 = new.param_groups[0]["betas"]
    for param in model.parameters():
        assert new.state[param]["step"].item() == 0
        assert torch.equal(new.state[param]["exp_avg"], old.state[param]["exp_avg"])
    assert new.param_groups[0]["lr"] == 5e-3
    moments = {p: (new.state[p]["exp_avg"].clone(), new.state[p]["exp_avg_sq"].clone()) for p in model.parameters()}
    model(torch.randn(8, 4)).pow(2).mean().backward()
    grads = {p: p.grad.clone() for p in model.parameters()}
    norm = torch.cat([g.flatten() for g in grads.values()]).norm()
    new.step()
    for param in model.parameters():
        g = grads[param] / max(norm.item(), 1.0)  # nvidia: pre-normalised by the global norm (max 1)
        m, v = moments[param]
        assert new.state[param]["step"].item() == 1
        torch.testing.assert_close(new.state[param]["exp_avg"], beta1 * m + (1 - beta1) * g)
        torch.testing.assert_close(new.state[param]["exp_avg_sq"], beta2 * v + (1 - beta2) * g * g)


def test_a_new_phase_refuses_the_state_of_other_parameters():
    model = torch.nn.Linear(4, 3)
    saved = Lamb([model.weight], lr=1e-2).state_dict()
    with pytest.raises(SettingError, match="checkpoint must hold the optimizer state of the same parameters"):
        continue_from_phase(Lamb(model.parameters(), lr=1e-2), saved)


# ------------------------------------------------------------------------------------------------ largest batch
def test_the_search_returns_the_largest_divisor_below_the_first_that_does_not_fit():
    calls = []

    def fits(n):
        calls.append(n)
        return n * 100 <= 1300, n * 100

    assert largest_fitting([1, 2, 3, 4, 6, 8, 12, 16, 24, 48], fits) == (12, 1200, [1, 2, 3, 4, 6, 8, 12, 16])
    assert calls == [1, 2, 3, 4, 6, 8, 12, 16]  # stops at the first failure


def test_the_micro_batch_fit_measures_a_real_step_and_names_the_field_when_nothing_fits():
    config = BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )

    def make():
        return BertForMaskedLM(config)

    fit = fit_micro_batch(
        make,
        seq_len=32,
        vocab_size=100,
        per_process_batch=12,
        device=torch.device("cpu"),
        margin=0.1,
        limit_bytes=1 << 50,
    )
    assert (fit.micro_batch, fit.accumulation, fit.tried) == (12, 1, (1, 2, 3, 4, 6, 12))
    assert fit.peak_bytes > 0
    with pytest.raises(SettingError, match="phase1_global_batch_size cannot be reached: not even a micro-batch of 1"):
        fit_micro_batch(
            make,
            seq_len=32,
            vocab_size=100,
            per_process_batch=12,
            device=torch.device("cpu"),
            margin=0.1,
            limit_bytes=1,
            field="phase1_global_batch_size",
        )
