"""The large-batch reproduction runner and the Trainer overhead benchmark, run as users run them, at smoke size.

The LRs each arm applied are checked against the rules written out here (not the library's plan), the tables
against the runs they summarise.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import statistics
import subprocess
import sys

import pytest
from conftest import REPO
from legw_oracle import legw_lr

#: Test accuracy of 10 classes; perplexity of a 2000-word vocabulary (uniform guessing: 2000); MLM loss over 4096
#: WordPiece tokens (uniform guessing: ln 4096 = 8.3; a model at smoke size has barely left it).
METRIC_RANGES = {"mnist1d": (0.0, 1.0), "wikitext2_lm": (1.0, 2000.0), "bert_tiny": (0.0, 2 * math.log(4096))}


def run_script(repo, *args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def runner_main(monkeypatch, script: str, *argv: str) -> int:
    """A benchmark script's ``main`` in this process (what ``python benchmarks/SCRIPT`` runs, without starting an
    interpreter): its folder first on the path for its sibling modules, the module registered for its dataclasses."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), REPO / "benchmarks" / script)
    runner = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, runner)
    spec.loader.exec_module(runner)
    return runner.main(list(argv))


def expected_lr(run, epoch, task):
    decay = task["decay"]
    return legw_lr(
        epoch,
        base_lr=run["base_lr"],
        k=run["batch"] / run["base_batch"],
        base_warmup_epochs=run["base_warmup_epochs"],
        epochs=task["epochs"],
        decay=decay["name"],
        power=decay["power"],
        rule=run["arm"],
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("large_batch")
    run_script(REPO, "benchmarks/large_batch.py", "--smoke", "--workers", "2", "--out", str(out), "--cache", str(out))
    return out, json.loads((out / "large_batch.json").read_text())


def test_every_task_arm_and_batch_ran(smoke):
    out, result = smoke
    assert set(result["tasks"]) == {"mnist1d", "wikitext2_lm", "bert_tiny"}
    for name, task in result["tasks"].items():
        for family in task["families"]:
            runs = [r for r in result["runs"] if r["task"] == name and r["family"] == family]
            cells = {(r["arm"], r["k"]) for r in runs}
            assert cells == {("none", 1)} | {
                (arm, k) for arm in ("legw", "linear", "sqrt", "none", "adascale") for k in task["ks"] if k > 1
            }
            low, high = METRIC_RANGES[name]
            for r in runs:
                # no smoke run diverges, and each metric lies where a model of the task can put it
                assert not r["diverged"] and low <= r["metric"] <= high, (name, family, r["arm"], r["k"], r["metric"])
                steps_per_epoch = math.ceil(r["dataset_size"] / r["batch"])
                if r["arm"] != "adascale":  # the others train the fixed epoch budget exactly
                    assert r["updates"] == math.ceil(task["epochs"] * steps_per_epoch)
        assert (out / f"large_batch_{name}.png").stat().st_size > 1000
        assert (out / f"large_batch_{name}_lr.png").stat().st_size > 1000
    meta = result["environment"]
    assert {"date", "machine", "torch", "transformers", "python"} <= set(meta)


def test_each_arm_applied_its_rule(smoke):
    _, result = smoke
    checked = 0
    for r in result["runs"]:
        if r["arm"] == "adascale":
            continue
        task = result["tasks"][r["task"]]
        steps_per_epoch = math.ceil(r["dataset_size"] / r["batch"])
        for epoch, lr in r["lr_curve"]:
            assert lr == pytest.approx(expected_lr(r, epoch, task), rel=1e-9), (r["task"], r["arm"], r["k"], epoch)
            checked += 1
        assert r["lr_curve"][0][0] == pytest.approx(1 / steps_per_epoch)
    assert checked > 100


def test_adascale_follows_its_gain(smoke):
    _, result = smoke
    runs = [r for r in result["runs"] if r["arm"] == "adascale" and r["k"] > 1]
    assert runs
    cap = result["adascale"]["epoch_cap"]
    for r in runs:
        task = result["tasks"][r["task"]]
        assert 1.0 <= r["mean_gain"] <= r["k"]
        # τ advances by the gain each update; it stops at the base run's length or at the epoch cap
        assert r["progress"] == pytest.approx(r["mean_gain"] * r["updates"], rel=1e-9)
        # the base run's length, written out: its updates at the base batch over the task's epochs
        base_updates = math.ceil(task["epochs"] * r["dataset_size"] / r["base_batch"])
        assert r["total_progress"] == base_updates
        if r["reached_end"]:  # stopped by the update whose gain (at most k) carried τ past that length
            assert base_updates <= r["progress"] < base_updates + r["k"]
        else:  # stopped by the epoch cap
            assert r["progress"] < base_updates and r["epochs"] >= cap * task["epochs"] - 1e-9
        # fewer updates than the base run, more samples than the others' epoch budget whenever r < k
        assert r["updates"] <= r["total_progress"]
        assert r["b_simple"] > 0
        # the last update's gain from its moments, written out (Johnson et al.): per-sample trace T, signal μ²
        trace, signal, base, k = r["last_trace"], r["last_signal"], r["base_batch"], r["k"]
        gain = min(max((trace / base + signal) / (trace / (k * base) + signal), 1.0), k)
        assert r["last_gain"] == pytest.approx(gain, rel=1e-6)
        # and the LR it set: the base run's schedule at the progress it reaches, times r (SGD) or √r (Adam, LAMB)
        power = 1.0 if task["families"][r["family"]]["optimizer"] == "momentum" else 0.5
        base_spe = math.ceil(r["dataset_size"] / base)
        schedule = dict(base_lr=r["base_lr"], k=1, base_warmup_epochs=r["base_warmup_epochs"], rule="none")
        base_lr_then = legw_lr(
            min(r["progress"], base_updates) / base_spe,
            epochs=task["epochs"], decay=task["decay"]["name"], power=task["decay"]["power"], **schedule,
        )  # fmt: skip
        assert r["last_lr"] == pytest.approx(gain**power * base_lr_then, rel=1e-6)


def test_tables_summarise_the_runs(smoke):
    out, result = smoke
    markdown = (out / "large_batch.md").read_text()
    for key, arms in result["summary"].items():
        name, family = key.split("/")
        assert f"### {family}:" in markdown
        for arm, by_batch in arms.items():
            assert f"| {arm} |" in markdown
            for batch, cell in by_batch.items():
                runs = [
                    r
                    for r in result["runs"]
                    if r["task"] == name
                    and r["family"] == family
                    and r["batch"] == int(batch)
                    and (r["arm"] == arm or r["k"] == 1)
                ]
                assert cell["seeds"] == len(runs) == 1
                finite = [r["metric"] for r in runs if not r["diverged"]]
                if finite:
                    assert cell["mean"] == pytest.approx(statistics.fmean(finite))
            # The Markdown row, read back: each batch's cell shows the mean of its runs (or "diverged").
            (row,) = [line for line in section_of(markdown, name, family) if line.startswith(f"| {arm} |")]
            batches = sorted(by_batch, key=int)
            shown = [text.strip().split("<br>")[0] for text in row.strip("|").split("|")[1:]]
            for batch, text in zip(batches, shown, strict=True):
                cell = by_batch[batch]
                assert text == ("diverged" if "mean" not in cell else f"{cell['mean']:.4g}"), (key, arm, batch)


def section_of(markdown: str, task: str, family: str) -> list[str]:
    """The lines of one task's family table."""
    lines = markdown.split(f"## {task}:")[1].split("\n## ")[0].split(f"### {family}:")[1].split("\n### ")[0]
    return lines.splitlines()


def test_each_task_records_and_shows_its_trivial_baseline(smoke):
    out, result = smoke
    markdown = (out / "large_batch.md").read_text()
    for task in result["tasks"].values():
        value = task["baseline"]["value"]
        assert f"Trivial baseline on the same data: {task['baseline']['name']}: {value:.4g}." in markdown
    # mnist1d's, counted here from the data the runner cached: the most frequent training class, always.
    import torch

    (data,) = out.glob("mnist1d-*.pt")
    tensors = torch.load(data)
    most_frequent = torch.bincount(torch.as_tensor(tensors["y"])).argmax()
    expected = (torch.as_tensor(tensors["y_test"]) == most_frequent).double().mean().item()
    assert result["tasks"]["mnist1d"]["baseline"]["value"] == pytest.approx(expected)
    # Uniform guessing is the worst a frequency can do: the unigram levels lie below it.
    assert result["tasks"]["bert_tiny"]["baseline"]["value"] < math.log(4096)
    assert result["tasks"]["wikitext2_lm"]["baseline"]["value"] < 2000


def test_a_run_10x_worse_than_its_base_is_marked_diverged_and_left_out_of_the_mean():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from large_batch import mark_exploded, summarise

    tasks = {
        "lm": {"metric": "validation perplexity", "higher_is_better": False},
        "bert": {"metric": "validation MLM loss", "higher_is_better": False},
    }

    def run(task, k, seed, metric):
        return {"task": task, "family": "f", "arm": "legw", "k": k, "batch": 4 * k, "seed": seed, "metric": metric,
                "diverged": False, "updates": 1, "epochs": 1.0}  # fmt: skip

    runs = [
        run("lm", 1, 0, 50.0), run("lm", 4, 0, 499.0), run("lm", 16, 0, 501.0),
        run("bert", 1, 0, 5.0),
        run("bert", 4, 0, 5.0 + math.log(10) - 0.01), run("bert", 16, 0, 5.0 + math.log(10) + 0.01),
    ]  # fmt: skip
    mark_exploded(runs, tasks)
    assert [r["diverged"] for r in runs] == [False, False, True, False, False, True]
    assert runs[2]["exploded_metric"] == 501.0 and runs[2]["metric"] is None
    summary = summarise(runs, lambda r: [r["arm"]])
    assert summary["lm/f"]["legw"]["64"] == {
        "seeds": 1, "diverged": 1, "updates": 1, "epochs": 1.0, "values": [None]
    }  # fmt: skip


def test_report_rewrites_tables_and_plots_from_the_saved_result(smoke, tmp_path, monkeypatch):
    out, _ = smoke
    copy = tmp_path / "large_batch.json"
    copy.write_text((out / "large_batch.json").read_text())
    assert runner_main(monkeypatch, "large_batch.py", "--report", str(copy)) == 0
    assert (tmp_path / "large_batch.md").read_text() == (out / "large_batch.md").read_text()
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(p.name for p in out.glob("*.png"))


def test_sweep_records_each_setting(repo, tmp_path):
    run_script(
        repo, "benchmarks/large_batch.py", "--sweep", "--smoke", "--tasks", "mnist1d", "--workers", "1",
        "--out", str(tmp_path), "--cache", str(tmp_path),
    )  # fmt: skip
    result = json.loads((tmp_path / "large_batch_sweep.json").read_text())
    family = result["tasks"]["mnist1d"]["families"]["adam"]
    settings = {(r["base_lr"], r["base_warmup_epochs"]) for r in result["runs"] if r["family"] == "adam"}
    warmups = [family["base_warmup_epochs"], *family["sweep_warmups"]]
    assert settings == {(lr, w) for lr in family["sweep_lrs"] for w in warmups}
    assert all(r["k"] == 1 for r in result["runs"])
    assert "lr 0.01, warmup 0.025 ep" in (tmp_path / "large_batch_sweep.md").read_text()


@pytest.mark.parametrize(
    ("script", "flags", "message"),
    [
        ("large_batch.py", ["--seeds", "0"], "--seeds must be >= 1"),
        ("large_batch.py", ["--workers", "0"], "--workers must be >= 1"),
        ("bert_scaling.py", ["--report", "missing.json"], "--report must be a result file written by this script"),
        ("bert_scaling.py", ["--runs", "missing.json"], "--runs must be a runs file written by this script"),
    ],
)
def test_bad_runner_flags_are_refused_before_any_work(tmp_path, capsys, monkeypatch, script, flags, message):
    with pytest.raises(SystemExit) as exited:  # argparse's error exits with status 2, as on the command line
        runner_main(monkeypatch, script, *flags, "--out", str(tmp_path / "out"))
    assert exited.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_trainer_overhead_smoke(repo, tmp_path):
    out = tmp_path / "overhead.json"
    run_script(repo, "benchmarks/trainer_overhead.py", "--smoke", "--json", str(out))
    result = json.loads(out.read_text())
    assert set(result["median_ms"]) == set(result["range_ms"]) == {"trainer_adamw", "trainer_lamb", "legw_lamb"}
    for run, (fastest, slowest) in result["range_ms"].items():
        assert 0 < fastest <= result["median_ms"][run] <= slowest
    assert all(math.isfinite(result[key]) and result[key] > 0 for key in ("lamb_math", "plugin", "total"))
    # the plugin's own per-step code was timed, and is a small part of a step
    assert 0 < result["plugin_code_ms_per_step"] < result["median_ms"]["legw_lamb"]


# ------------------------------------------------------------------------------------------- the BERT scaling study
#: The study's lattice and warmup, written out: LR = anchor · √2^j; the base warmup, kept or multiplied by k.
STUDY_ANCHORS = {"lamb": 1e-2, "adamw": 1e-3}
STUDY_BASE_WARMUP_EPOCHS = 0.025


@pytest.fixture(scope="module")
def study(smoke):
    cache, _ = smoke  # the large-batch smoke's data cache: the same BERT corpus and tokenizer
    out = cache / "study"
    run_script(
        REPO, "benchmarks/bert_scaling.py", "--smoke", "--workers", "1", "--out", str(out), "--cache", str(cache)
    )
    return out, json.loads((out / "bert_scaling.json").read_text())


def lattice_index(family, lr):
    j = round(2 * math.log2(lr / STUDY_ANCHORS[family]))
    assert lr == pytest.approx(STUDY_ANCHORS[family] * 2 ** (j / 2), rel=1e-12), (family, lr)
    return j


def setting_means(result, family):
    """{(k, j, warmup epochs): (mean or inf when a seed diverged, runs)} of the grid runs, counted here."""
    groups = {}
    for r in result["runs"]:
        if r["family"] == family and r["arm"] == "none":
            key = (r["k"], lattice_index(family, r["base_lr"]), r["base_warmup_epochs"])
            groups.setdefault(key, []).append(r)
    return {
        key: (math.inf if any(r["diverged"] for r in runs) else statistics.fmean(r["metric"] for r in runs), runs)
        for key, runs in groups.items()
    }


def setting_at(means, k, j, warmup_epochs):
    (found,) = [value for key, value in means.items() if key[:2] == (k, j) and math.isclose(key[2], warmup_epochs)]
    return found


def test_the_study_tunes_each_batch_on_the_lattice_and_grows_the_search_past_an_edge_best(study):
    _, result = study
    meta = result["meta"]
    for family, part in result["summary"].items():
        means = setting_means(result, family)
        for k in meta["ks"]:
            at_k = {key: mean for key, (mean, _) in means.items() if key[0] == k}
            finite = {key: mean for key, mean in at_k.items() if math.isfinite(mean)}
            best = min(finite, key=finite.get)
            tuned = part["tuned"][str(k)]
            assert lattice_index(family, tuned["lr"]) == best[1] and tuned["mean"] == pytest.approx(finite[best])
            # the runs applied the setting's schedule (its LR and warmup, the task's decay), update by update
            for r in means[best][1]:
                assert r["base_lr"] == pytest.approx(tuned["lr"], rel=1e-12)
                for epoch, lr in r["lr_curve"]:
                    assert lr == pytest.approx(expected_lr(r, epoch, meta["task"]), rel=1e-9)
            same_warmup = {key[1] for key in at_k if key[2] == best[2]}
            window = meta["searches"][family]["windows"][str(k)]
            growth = meta["searches"][family]["max_growth"]
            for neighbour in (best[1] - 1, best[1] + 1):
                # a neighbour the search did not run is beyond the growth limit of its first window
                assert neighbour in same_warmup or min(abs(neighbour - j) for j in window) > growth
            assert tuned["interior"] == ({best[1] - 1, best[1] + 1} <= same_warmup)


def test_each_rules_setting_is_the_rule_written_out_from_the_tuned_base_lr(study):
    _, result = study
    meta = result["meta"]
    exponents = {"legw": (0.5, 1.0), "sqrt": (0.5, 0.0), "linear": (1.0, 0.0), "none": (0.0, 0.0)}
    for family, part in result["summary"].items():
        base_lr = part["tuned"]["1"]["lr"]
        means = setting_means(result, family)
        assert set(part["rules"]) >= set(meta["searches"][family]["rules"])
        for rule in meta["searches"][family]["rules"]:
            lr_exponent, warmup_exponent = exponents[rule]
            for k in meta["ks"][1:]:
                cell = part["rules"][rule][str(k)]
                assert cell["lr"] == pytest.approx(base_lr * k**lr_exponent, rel=1e-12)
                warmup = STUDY_BASE_WARMUP_EPOCHS * k**warmup_exponent
                assert cell["warmup"] == ("scaled" if warmup_exponent else "fixed")
                mean, runs = setting_at(means, k, lattice_index(family, cell["lr"]), warmup)
                assert len(runs) == meta["seeds"]
                # the gap, per seed: the rule's loss minus the tuned setting's loss of the same seed
                best = part["tuned"][str(k)]
                best_warmup = STUDY_BASE_WARMUP_EPOCHS * (k if best["warmup"] == "scaled" else 1)
                _, best_runs = setting_at(means, k, lattice_index(family, best["lr"]), best_warmup)
                tuned = {r["seed"]: r["metric"] for r in best_runs}
                if math.isfinite(mean):
                    assert cell["gaps"] == pytest.approx([r["metric"] - tuned[r["seed"]] for r in runs])
                    assert cell["gap"] == pytest.approx(statistics.fmean(cell["gaps"]))
                else:
                    assert "gap" not in cell and cell["diverged"] >= 1


def test_the_study_measures_b_simple_early_in_every_base_run_and_runs_adascale_from_the_tuned_base(study):
    _, result = study
    for r in result["runs"]:
        if r["k"] == 1:
            assert r["plain_b_simple_updates"] == max(1, round(0.15 * r["updates"]))
            assert r["plain_b_simple"] > 0
        else:
            assert "plain_b_simple" not in r
    for family, part in result["summary"].items():
        base = [r for r in result["runs"] if r["family"] == family and r["k"] == 1
                and r["base_lr"] == pytest.approx(part["tuned"]["1"]["lr"])]  # fmt: skip
        assert part["b_simple"] == {str(r["seed"]): r["plain_b_simple"] for r in base}
    adascale = [r for r in result["runs"] if r["arm"] == "adascale"]
    assert {r["k"] for r in adascale} == set(result["meta"]["ks"][1:])
    assert all(r["base_lr"] == pytest.approx(result["summary"]["lamb"]["tuned"]["1"]["lr"]) for r in adascale)


def test_the_study_report_shows_the_unigram_level_and_every_tuned_loss(study, tmp_path, monkeypatch):
    out, result = study
    markdown = (out / "bert_scaling.md").read_text()
    assert f"**{result['unigram']:.3f}** nats" in markdown
    for family, part in result["summary"].items():
        section = markdown.split(f"## {family}\n")[1].split("### Each rule")[0]  # the tuned table
        for key, cell in part["tuned"].items():
            row = f"| {int(key.partition('/')[0]) * result['meta']['base_batch']} |"
            per_warmup = "/" in key
            (line,) = [
                line for line in section.splitlines()
                if line.startswith(row) and f"| {cell['lr']:.4g}" in line and ("best of all" in line) != per_warmup
            ]  # fmt: skip
            shown = line.split("|")[5].strip()
            assert shown == f"{cell['mean']:.3f} ± {cell['spread']:.3f}"
            assert float(line.split("|")[6]) == pytest.approx(result["unigram"] - cell["mean"], abs=1e-3)
    for name in ("bert_scaling_best_lr.png", "bert_scaling_gaps.png", "bert_scaling_sweep.png"):
        assert (out / name).stat().st_size > 1000
    copy = tmp_path / "bert_scaling.json"
    copy.write_text((out / "bert_scaling.json").read_text())
    assert runner_main(monkeypatch, "bert_scaling.py", "--report", str(copy)) == 0
    assert (tmp_path / "bert_scaling.md").read_text() == markdown


def test_a_study_run_above_the_unigram_level_by_ln_10_is_diverged_and_never_tuned():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bert_scaling

    search = bert_scaling.SEARCHES["lamb"]  # its first window at k = 1: j = -3, -2, -1
    assert search.windows[1] == (-3, -2, -1) and search.max_growth >= 1
    # The unigram level given: building the task's data here would set transformers' logging for the whole worker
    # process (the benchmark quiets it), and later tests in it read their log records through that level.
    unigram = 6.0
    fresh = bert_scaling.Study({"lamb": search}, smoke=True, seeds=2, cache="unused", unigram=unigram)

    def run(j, seed, metric):
        return {"task": "bert_scaling", "family": "lamb", "arm": "none", "k": 1, "seed": seed,
                "base_lr": 1e-2 * 2 ** (j / 2), "base_warmup_epochs": STUDY_BASE_WARMUP_EPOCHS,
                "metric": metric, "diverged": metric is None, "updates": 10, "epochs": 1.0}  # fmt: skip

    fresh.add([
        run(-3, 0, unigram - 0.1), run(-3, 1, unigram - 0.1),
        run(-2, 0, unigram - 0.5), run(-2, 1, unigram + math.log(10) + 0.01),  # one seed exploded
        run(-1, 0, unigram - 0.2), run(-1, 1, unigram - 0.2),
    ])  # fmt: skip
    exploded = fresh.runs[3]
    assert exploded["diverged"] and exploded["metric"] is None and exploded["exploded_metric"] > unigram
    # the lowest single loss (j = -2, seed 0) is not tuned, its other seed diverged: j = -1 is the best mean, and
    # at the window's edge the search is not done until j = 0 ran
    assert fresh.best("lamb", 1) is None
    assert fresh.growth("lamb", 1, ("fixed",)) == [(1, 0, "fixed")]
    fresh.add([run(0, 0, unigram - 0.05), run(0, 1, unigram - 0.05)])
    assert fresh.growth("lamb", 1, ("fixed",)) == []
    assert fresh.best("lamb", 1) == (1, -1, "fixed")


# ----------------------------------------------------------------------------------------- batch_ramp.py (smoke)
@pytest.fixture(scope="module")
def ramp_smoke(smoke):
    """batch_ramp.py --smoke in this process, one worker, on the data the large-batch smoke run cached."""
    import torch
    from accelerate.state import AcceleratorState

    cache, _ = smoke
    out = cache / "batch_ramp"
    threads = torch.get_num_threads()
    AcceleratorState._reset_state(True)
    with pytest.MonkeyPatch.context() as monkeypatch:
        argv = ("--smoke", "--workers", "1", "--out", str(out), "--cache", str(cache))
        assert runner_main(monkeypatch, "batch_ramp.py", *argv) == 0
    AcceleratorState._reset_state(True)
    torch.set_num_threads(threads)  # each run takes one thread
    return out, json.loads((out / "batch_ramp.json").read_text())


def test_the_ramp_benchmark_runs_every_arm_of_every_task(ramp_smoke):
    out, result = ramp_smoke
    assert set(result["tasks"]) == {"wikitext2_lm", "bert_tiny"}
    for name, task in result["tasks"].items():
        runs = [r for r in result["runs"] if r["task"] == name]
        assert [r["label"] for r in runs] == [*(f"fixed {b}" for b in task["fixed"]), "scheduled", "auto"]
        low, high = METRIC_RANGES[name]
        for r in runs:
            assert not r["diverged"] and low <= r["metric"] <= high, (name, r["label"], r["metric"])
            # evaluated once in each 1/16 epoch of samples the run enters, the last one at the end of the run
            sixteenths = [math.floor(16 * e["samples"] / r["dataset_size"]) for e in r["evaluations"]]
            assert all(earlier < later for earlier, later in itertools.pairwise(sixteenths))
            assert r["evaluations"][-1]["samples"] == r["samples"] >= task["epochs"] * r["dataset_size"]
        assert (out / f"batch_ramp_{name}.png").stat().st_size > 1000


def _ramp_updates(stages: list[tuple[int, float]], n: int, epochs: float) -> list[int]:
    """The batch of every update of a ramp, written out: an update takes the batch of the stage its progress
    starts in; the run ends once ``epochs`` of ``n`` samples are taken."""
    batches, samples = [], 0
    while samples < epochs * n:
        batch = [b for b, start in stages if start * n <= samples][-1]
        batches.append(batch)
        samples += batch
    return batches


def test_fixed_and_scheduled_arms_take_the_batches_their_ramp_gives(ramp_smoke):
    _, result = ramp_smoke
    for name, task in result["tasks"].items():
        for r in (r for r in result["runs"] if r["task"] == name and r["arm"] != "auto"):
            text = f"{r['batch']}@0" if r["arm"] == "fixed" else task["scheduled"]
            stages = [(int(b), float(s)) for b, s in (part.split("@") for part in text.split(","))]
            batches = _ramp_updates(stages, r["dataset_size"], task["epochs"])
            assert r["ramp"] == text and r["updates"] == len(batches) and r["samples"] == sum(batches)
            starts = [[sum(batches[:i]) / r["dataset_size"], b] for i, b in enumerate(batches)]
            assert r["batches"] == [s for i, s in enumerate(starts) if i == 0 or s[1] != starts[i - 1][1]]


def test_the_automatic_arm_doubles_by_its_rule_and_its_decisions_replay_as_its_ramp(ramp_smoke):
    from legw_hf.ramp import ramp_from_decisions

    _, result = ramp_smoke
    autos = [r for r in result["runs"] if r["arm"] == "auto"]
    assert any(r["decisions"] for r in autos)  # the smoke's patience (2 updates) lets at least one run double
    threshold = result["auto_ramp"]["efficiency"]
    for r in autos:
        task = result["tasks"][r["task"]]
        batch = task["base_batch"]
        for decision in r["decisions"]:
            b_simple = decision["trace"] / decision["signal"]
            assert decision["old_batch"] == batch and decision["new_batch"] == 2 * batch <= task["fixed"][-1]
            assert decision["efficiency"] == pytest.approx((batch + b_simple) / (2 * batch + b_simple))
            assert decision["efficiency"] >= threshold
            batch = decision["new_batch"]
        assert r["ramp"] == ramp_from_decisions(r["decisions"], start_batch=task["base_batch"])
        assert [b for _, b in r["batches"]] == [task["base_batch"], *(d["new_batch"] for d in r["decisions"])]


def test_the_ramp_table_counts_updates_to_the_base_runs_final_quality(ramp_smoke):
    out, result = ramp_smoke
    markdown = (out / "batch_ramp.md").read_text()
    for name, task in result["tasks"].items():
        runs = [r for r in result["runs"] if r["task"] == name]
        target = max(r["metric"] for r in runs if r["label"] == f"fixed {task['base_batch']}")  # lower is better
        assert result["summary"][name]["target"] == target
        section = markdown.split(f"## {name}:")[1].split("\n## ")[0]
        assert f"{task['baseline']['name']}: {task['baseline']['value']:.4g}" in section
        assert f"Target: the base run's final quality, {target:.4g}" in section
        for r in runs:
            first = next((e for e in r["evaluations"] if e["metric"] <= target), None)
            row = next(line for line in section.splitlines() if line.startswith(f"| {r['label']} |"))
            cells = [cell.strip() for cell in row.split("|")[1:-1]]
            assert cells[1] == f"{r['metric']:.4g}" and cells[2] == str(r["updates"])
            if first is None:
                assert cells[3:6] == ["0/1", "–", "–"]
            else:
                assert cells[3:6] == ["1/1", str(first["updates"]), f"{first['epoch']:.4g}"]


def test_the_ramp_report_is_rewritten_from_its_saved_result(ramp_smoke, tmp_path, monkeypatch):
    out, _ = ramp_smoke
    copy = tmp_path / "batch_ramp.json"
    copy.write_text((out / "batch_ramp.json").read_text())
    assert runner_main(monkeypatch, "batch_ramp.py", "--report", str(copy)) == 0
    assert (tmp_path / "batch_ramp.md").read_text() == (out / "batch_ramp.md").read_text()
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(p.name for p in out.glob("*.png"))
