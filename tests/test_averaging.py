"""Checkpoint averaging: the element-wise mean of the last N checkpoints' weights (written out in the tests with
torch.stack().mean()), dtypes kept, shards read, the result loadable, the checkpoints untouched, and bad input."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from procs import python_env
from transformers import BertConfig, BertForMaskedLM

from legw_hf import SettingError
from legw_hf.averaging import average_checkpoints, checkpoint_weights

CONFIG = BertConfig(
    vocab_size=60,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=32,
)


def save_run(root: Path, steps=(10, 20, 30, 40), dtype=torch.float32, shard: str | None = None) -> list[Path]:
    """Checkpoints as Trainer leaves them: model weights (save_pretrained), config, and training state files."""
    paths = []
    for index, step in enumerate(steps):
        torch.manual_seed(index)
        model = BertForMaskedLM(CONFIG).to(dtype)
        path = root / f"checkpoint-{step}"
        model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
        (path / "optimizer.pt").write_bytes(b"optimizer state")
        (path / "trainer_state.json").write_text("{}")
        paths.append(path)
    return paths


def fingerprint(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(("dtype", "shard"), [(torch.float32, None), (torch.bfloat16, "2KB")])
def test_average_is_the_elementwise_mean_of_the_last_n_in_their_dtype(tmp_path, dtype, shard):
    checkpoints = save_run(tmp_path, dtype=dtype, shard=shard)
    if shard:
        assert (checkpoints[0] / "model.safetensors.index.json").is_file()  # really sharded
    before = {p.name: fingerprint(p) for p in checkpoints}
    output = average_checkpoints(tmp_path, last=3)
    assert output == tmp_path / "averaged-last-3"
    chosen = [checkpoint_weights(p) for p in checkpoints[1:]]  # the 3 newest: steps 20, 30, 40
    averaged = checkpoint_weights(output)
    assert set(averaged) == set(chosen[0])
    for key, value in averaged.items():
        expected = torch.stack([w[key].to(torch.float64) for w in chosen]).mean(0).to(dtype)
        assert value.dtype == dtype
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)
    # a model directory transformers loads, with the newest checkpoint's config; no training state copied
    loaded = BertForMaskedLM.from_pretrained(output)
    assert loaded.config.hidden_size == 16 and loaded.dtype == dtype
    torch.testing.assert_close(
        loaded.bert.embeddings.word_embeddings.weight, averaged["bert.embeddings.word_embeddings.weight"]
    )
    assert not (output / "optimizer.pt").exists() and not (output / "trainer_state.json").exists()
    assert {p.name: fingerprint(p) for p in checkpoints} == before  # the checkpoints are untouched


def test_the_cli_averages_and_refuses_with_one_line(tmp_path):
    save_run(tmp_path)

    def average(*flags: str) -> subprocess.CompletedProcess:
        cli = [sys.executable, "-m", "legw_hf.cli", "average-checkpoints", str(tmp_path), *flags]
        return subprocess.run(cli, capture_output=True, text=True, env=python_env(), timeout=300)

    result = average("--last", "2", "--output", str(tmp_path / "avg"))
    assert result.returncode == 0 and f"wrote {tmp_path / 'avg'}" in result.stdout, result.stderr
    again = average("--last", "2", "--output", str(tmp_path / "avg"))
    assert again.returncode == 2
    assert again.stderr.startswith("legw-hf average-checkpoints: error: --output must not exist already")


def test_bad_averaging_inputs_are_refused_before_anything_is_written(tmp_path):
    checkpoints = save_run(tmp_path, steps=(1, 2))
    with pytest.raises(
        SettingError, match=r"last must not exceed the checkpoints in .* \(2: checkpoint-1, checkpoint-2\)"
    ):
        average_checkpoints(tmp_path, last=3)
    with pytest.raises(SettingError, match="last must be an integer >= 1"):
        average_checkpoints(tmp_path, last=0)
    (tmp_path / "taken").mkdir()
    with pytest.raises(SettingError, match="output must not exist already"):
        average_checkpoints(tmp_path, last=2, output=tmp_path / "taken")
    # another model shape in the newest checkpoint
    other = BertForMaskedLM(BertConfig(**{**CONFIG.to_dict(), "intermediate_size": 32}))
    other.save_pretrained(tmp_path / "checkpoint-3")
    with pytest.raises(SettingError, match="must have the same shape and dtype for 'bert.encoder.layer.0.intermediate"):
        average_checkpoints(tmp_path, last=2)
    # another set of tensors
    more = BertForMaskedLM(BertConfig(**{**CONFIG.to_dict(), "num_hidden_layers": 2}))
    more.save_pretrained(tmp_path / "checkpoint-4")
    with pytest.raises(SettingError, match="must hold the same tensors: checkpoint-4 lacks"):
        average_checkpoints(tmp_path, last=2)
    # no weights at all
    (tmp_path / "checkpoint-5").mkdir()
    with pytest.raises(SettingError, match="must hold safetensors model weights"):
        average_checkpoints(tmp_path, last=2)
    assert not (tmp_path / "averaged-last-2").exists() and not (tmp_path / "averaged-last-2.partial").exists()
    assert (checkpoints[0] / "optimizer.pt").read_bytes() == b"optimizer state"
