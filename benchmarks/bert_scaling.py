"""Does LEGW hold for BERT? An LR × batch study of BERT-tiny at a fixed epoch budget, with LAMB and AdamW.

The question (You et al., "Large-Batch Training for LSTM and Beyond"): when the batch grows k-fold, how far is each
rule's setting from the best LR found by search at that batch? LEGW's claim is that √k peak LR with k× the warmup
in epochs lands within noise of that optimum, without retuning.

At every batch k·B0 (B0 = 4, k in 1, 4, 16; 2 epochs, so 158 updates at the largest batch) the peak LR is searched
on a √2 lattice (LR = anchor · √2^j) until the best setting is interior: the search starts from a window of lattice
points and grows it by one point at a time while the best mean is at an edge. At k > 1 LAMB's search runs with the
base warmup epochs kept fixed and with k× of them; AdamW's with k× (LEGW's). The best mean over seeds at a batch is
the *tuned* setting. Each rule's setting, computed by ``legw_hf``'s planner from the tuned base setting (k = 1), is a
lattice point, run like the others:

- ``legw``: √k peak LR, k× warmup epochs; ``sqrt``: √k, the same warmup epochs; ``linear``: k×, the same warmup;
  ``none``: the base setting unchanged;
- ``adascale`` (LAMB): the tuned base schedule driven by AdaScale's ``sqrt_gain`` (large_batch.py's arm).

Each rule's gap to the tuned setting is the per-seed difference of their validation MLM losses (the same seeds:
the same initialisations, data orders and masks), reported as mean ± standard deviation over seeds. B_simple is
measured with plain gradients (4 micro-batches per update) over the first 15% of every base run's updates, and
reported per seed for the tuned base setting. Every figure stands beside the unigram level of the same masked
validation tokens; a run above it by ln 10 (10× its perplexity) or non-finite is diverged, never averaged.

    python benchmarks/bert_scaling.py                      # the study: results/bert_scaling.{json,md,png}
    python benchmarks/bert_scaling.py --smoke --out /tmp/s  # seconds: every path at toy size
    python benchmarks/bert_scaling.py --report benchmarks/results/bert_scaling.json   # redraw from a saved result
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import large_batch as lb

from legw_hf import LegwConfig

TASK = "bert_scaling"
#: A setting at batch k·B0: (k, lattice index j of the peak LR, warmup: "fixed" or "scaled").
Setting = tuple[int, int, str]
#: Fraction of a base run's first updates over which B_simple is measured.
NOISE_FRACTION = 0.15
#: A run this far above the unigram level (nats: 10× its perplexity) is diverged.
DIVERGED_ABOVE_UNIGRAM = math.log(10.0)


@dataclass(frozen=True)
class Search:
    """An optimizer's LR search: the lattice's anchor, the first window of lattice indices at each k, the warmups
    searched at k > 1, the rules whose settings are run, and how far a window may grow past its first points."""

    anchor: float
    windows: dict[int, tuple[int, ...]]
    warmups: tuple[str, ...]
    rules: tuple[str, ...]
    adascale: bool
    max_growth: int = 4


SEARCHES = {
    "lamb": Search(
        anchor=1e-2,
        windows={1: (-3, -2, -1), 4: (-2, -1, 0), 16: (-1, 0, 1)},
        warmups=("fixed", "scaled"),
        rules=("legw", "sqrt", "linear", "none"),
        adascale=True,
    ),
    "adamw": Search(
        anchor=1e-3,
        windows={1: (-1, 0, 1), 4: (0, 1, 2), 16: (1, 2, 3)},
        warmups=("scaled",),
        rules=("legw",),
        adascale=False,
    ),
}
SMOKE_SEARCHES = {
    name: Search(search.anchor, {1: (0,), 4: (0,)}, search.warmups, search.rules, search.adascale, max_growth=1)
    for name, search in SEARCHES.items()
}


def lattice_lr(search: Search, j: int) -> float:
    return search.anchor * math.sqrt(2.0) ** j


def lattice_index(search: Search, lr: float) -> int:
    """The lattice index of ``lr``, which must lie on the lattice (every rule's √k and k do, for k a power of 4)."""
    j = round(2 * math.log2(lr / search.anchor))
    if not math.isclose(lattice_lr(search, j), lr, rel_tol=1e-9):
        raise ValueError(f"LR {lr:g} is not on the √2 lattice of {search.anchor:g}")
    return j


class Study:
    """The runs so far, what they say, and which runs are still needed (a pure function of the runs)."""

    def __init__(
        self, searches: dict[str, Search], smoke: bool, seeds: int, cache: str, unigram: float | None = None
    ) -> None:
        self.task = lb.TASKS[TASK]
        self.size = self.task.size(smoke)
        self.searches, self.smoke, self.seeds, self.cache = searches, smoke, seeds, cache
        self.runs: list[dict[str, Any]] = []
        #: The unigram level of the validation masks (from the task's data unless given).
        self.unigram = lb.task_data(TASK, smoke, cache).baseline if unigram is None else unigram

    # ------------------------------------------------------------------------------------------ cells and results
    def warmup_epochs(self, family: str, k: int, warmup: str) -> float:
        base = self.task.families[family].base_warmup_epochs
        return base * k if warmup == "scaled" else base

    def cell(self, family: str, setting: Setting, seed: int) -> lb.Cell:
        k, j, warmup = setting
        return lb.Cell(
            TASK,
            family,
            "none",
            k,
            seed,
            self.smoke,
            self.cache,
            base_lr=lattice_lr(self.searches[family], j),
            base_warmup_epochs=self.warmup_epochs(family, k, warmup),
            noise_fraction=NOISE_FRACTION if k == 1 else 0.0,
        )

    def setting_of(self, run: dict[str, Any]) -> Setting | None:
        if run["arm"] != "none":
            return None
        k = run["k"]
        base_warmup = self.task.families[run["family"]].base_warmup_epochs
        warmup = "fixed" if math.isclose(run["base_warmup_epochs"], base_warmup) else "scaled"
        return k, lattice_index(self.searches[run["family"]], run["base_lr"]), warmup

    def by_setting(self, family: str) -> dict[Setting, list[dict[str, Any]]]:
        table: dict[Setting, list[dict[str, Any]]] = {}
        for run in self.runs:
            setting = self.setting_of(run) if run["family"] == family else None
            if setting is not None:
                table.setdefault(setting, []).append(run)
        return table

    def score(self, runs: list[dict[str, Any]]) -> float | None:
        """The mean metric over all seeds; None until every seed ran; inf when any seed diverged."""
        if len(runs) < self.seeds:
            return None
        if any(r["diverged"] for r in runs):
            return math.inf
        return statistics.fmean(r["metric"] for r in runs)

    def searched(self, family: str, k: int) -> tuple[str, ...]:
        return ("fixed",) if k == 1 else self.searches[family].warmups

    def best(self, family: str, k: int, warmup: str | None = None) -> Setting | None:
        """The tuned setting at k (over the searched warmups, or one), once its search is complete; else None."""
        table = self.by_setting(family)
        warmups = (warmup,) if warmup else self.searched(family, k)
        scored = {s: self.score(runs) for s, runs in table.items() if s[0] == k and s[2] in warmups}
        if not scored or any(v is None for v in scored.values()) or self.growth(family, k, warmups):
            return None
        finite = {s: v for s, v in scored.items() if math.isfinite(v)}
        return min(finite, key=finite.get) if finite else None

    def growth(self, family: str, k: int, warmups: tuple[str, ...]) -> list[Setting]:
        """The lattice points the search at k still needs: one past each edge where the best mean is."""
        search, table = self.searches[family], self.by_setting(family)
        first = search.windows[k]
        needed = []
        for warmup in warmups:
            scored = {s[1]: self.score(runs) for s, runs in table.items() if s[0] == k and s[2] == warmup}
            scored = {j: v for j, v in scored.items() if v is not None}
            if not scored:
                continue
            finite = {j: v for j, v in scored.items() if math.isfinite(v)}
            if not finite:  # everything diverged: look lower
                low = min(scored) - 1
                if low >= min(first) - search.max_growth:
                    needed.append((k, low, warmup))
                continue
            best = min(finite, key=finite.get)
            for neighbour in (best - 1, best + 1):  # the best must have both neighbours run
                if neighbour not in scored and abs(neighbour - _nearest(first, neighbour)) <= search.max_growth:
                    needed.append((k, neighbour, warmup))
        return needed

    def rule_settings(self, family: str) -> dict[tuple[str, int], Setting]:
        """Each rule's setting at each k > 1, from the tuned base setting, as legw_hf's planner computes it."""
        base = self.best(family, 1)
        if base is None:
            return {}
        search = self.searches[family]
        n = lb.task_data(TASK, self.smoke, self.cache).size
        settings = {}
        for rule in search.rules:
            config = LegwConfig(
                base_batch_size=self.size.base_batch,
                base_lr=lattice_lr(search, base[1]),
                base_warmup_epochs=self.warmup_epochs(family, 1, "fixed"),
                rule=rule,
                decay=self.task.decay,
            )
            for k in self.size.ks[1:]:
                plan = config.plan(batch_size=k * self.size.base_batch, dataset_size=n, epochs=self.size.epochs)
                scaled = not math.isclose(plan.warmup_epochs, self.warmup_epochs(family, k, "fixed"))
                settings[rule, k] = (k, lattice_index(search, plan.peak_lr), "scaled" if scaled else "fixed")
        return settings

    def needed(self) -> list[lb.Cell]:
        """The runs still to do: the first windows, growth past edges, the rules' settings, AdaScale."""
        cells: list[lb.Cell] = []
        for family, search in self.searches.items():
            table = self.by_setting(family)
            wanted: set[Setting] = set()
            for k in self.size.ks:
                wanted |= {(k, j, w) for w in self.searched(family, k) for j in search.windows[k]}
                wanted |= set(self.growth(family, k, self.searched(family, k)))
            wanted |= set(self.rule_settings(family).values())
            for setting in sorted(wanted):
                done = {r["seed"] for r in table.get(setting, [])}
                cells += [self.cell(family, setting, seed) for seed in range(self.seeds) if seed not in done]
            base = self.best(family, 1)
            if search.adascale and base is not None:
                done = {(r["k"], r["seed"]) for r in self.runs if r["family"] == family and r["arm"] == "adascale"}
                cells += [
                    lb.Cell(
                        TASK,
                        family,
                        "adascale",
                        k,
                        seed,
                        self.smoke,
                        self.cache,
                        base_lr=lattice_lr(search, base[1]),
                        base_warmup_epochs=self.warmup_epochs(family, 1, "fixed"),
                    )
                    for k in self.size.ks[1:]
                    for seed in range(self.seeds)
                    if (k, seed) not in done
                ]
        return cells

    def add(self, runs: list[dict[str, Any]]) -> None:
        for run in runs:
            if run["metric"] is not None and run["metric"] > self.unigram + DIVERGED_ABOVE_UNIGRAM:
                run.update(diverged=True, exploded=True, exploded_metric=run["metric"], metric=None)
        self.runs += runs

    # ----------------------------------------------------------------------------------------------------- summary
    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for family, search in self.searches.items():
            table = self.by_setting(family)
            settings = [
                {
                    "k": s[0],
                    "batch": s[0] * self.size.base_batch,
                    "lr": lattice_lr(search, s[1]),
                    "lattice_index": s[1],
                    "warmup": s[2],
                    "warmup_epochs": self.warmup_epochs(family, s[0], s[2]),
                    **describe(runs, self.seeds, self.unigram),
                }
                for s, runs in sorted(table.items())
            ]
            tuned = {}
            for k in self.size.ks:
                searched = self.searched(family, k)
                for warmup in (None, *searched) if len(searched) > 1 else (None,):
                    best = self.best(family, k, warmup)
                    if best is not None:
                        run = {s[1] for s in table if s[0] == k and s[2] == best[2]}
                        tuned[f"{k}" if warmup is None else f"{k}/{warmup}"] = {
                            "lr": lattice_lr(search, best[1]),
                            "warmup": best[2],
                            "interior": best[1] - 1 in run and best[1] + 1 in run,
                            **describe(table[best], self.seeds, self.unigram),
                        }
            rules = {}
            for (rule, k), setting in self.rule_settings(family).items():
                rules.setdefault(rule, {})[str(k)] = self.gap(family, table.get(setting, []), k) | {
                    "lr": lattice_lr(search, setting[1]),
                    "warmup": setting[2],
                }
            if search.adascale:
                for k in self.size.ks[1:]:
                    runs = [r for r in self.runs if r["family"] == family and r["arm"] == "adascale" and r["k"] == k]
                    if runs:
                        rules.setdefault("adascale", {})[str(k)] = self.gap(family, runs, k) | {
                            "epochs": statistics.fmean(r["epochs"] for r in runs),
                            "mean_gain": statistics.fmean(r["mean_gain"] for r in runs),
                        }
            base = self.best(family, 1)
            noise = {str(r["seed"]): r["plain_b_simple"] for r in table[base] if "plain_b_simple" in r} if base else {}
            out[family] = {"settings": settings, "tuned": tuned, "rules": rules, "b_simple": noise}
        return out

    def gap(self, family: str, runs: list[dict[str, Any]], k: int) -> dict[str, Any]:
        """A rule's runs against the tuned setting at k, seed by seed."""
        best = self.best(family, k)
        result = describe(runs, self.seeds, self.unigram)
        if best is None or not runs:
            return result
        tuned = {r["seed"]: r["metric"] for r in self.by_setting(family)[best]}
        gaps = [r["metric"] - tuned[r["seed"]] for r in runs if not r["diverged"] and r["seed"] in tuned]
        if gaps and not result["diverged"]:
            result["gaps"] = gaps
            result["gap"], result["gap_spread"] = lb._spread(gaps)
        return result


def _nearest(window: tuple[int, ...], j: int) -> int:
    return min(window, key=lambda i: abs(i - j))


def describe(runs: list[dict[str, Any]], seeds: int, unigram: float) -> dict[str, Any]:
    """Mean ± spread over seeds (diverged seeds counted, never averaged), the per-seed values, the margin below the
    unigram level and the updates taken."""
    finite = [r["metric"] for r in runs if not r["diverged"]]
    cell: dict[str, Any] = {
        "seeds": len(runs),
        "diverged": sum(r["diverged"] for r in runs),
        "values": [r["metric"] for r in sorted(runs, key=lambda r: r["seed"])],
        "updates": round(statistics.fmean(r["updates"] for r in runs)) if runs else 0,
    }
    if finite and not cell["diverged"]:
        cell["mean"], cell["spread"] = lb._spread(finite)
        cell["below_unigram"] = unigram - cell["mean"]
    return cell


# ---------------------------------------------------------------------------------------------------------- report
def _value(cell: dict[str, Any]) -> str:
    if cell.get("diverged"):
        return f"diverged ({cell['diverged']}/{cell['seeds']})"
    if "mean" not in cell:
        return "–"
    return f"{cell['mean']:.3f} ± {cell['spread']:.3f}"


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    meta, unigram = result["meta"], result["unigram"]
    lines = ["# BERT LR × batch study", ""]
    lines += [f"- {k}: {v}" for k, v in meta["environment"].items()]
    lines += [
        f"- command: `{meta['command']}`",
        f"- wall time: {meta['seconds'] / 60:.1f} min, {len(result['runs'])} runs",
        f"- task: {meta['task']['title']}; {meta['task']['data']}",
        f"- base batch {meta['base_batch']}, k in {meta['ks']}, {meta['epochs']:g} epochs, "
        f"{meta['decay']} decay, base warmup {meta['base_warmup_epochs']:g} epochs; {meta['seeds']} seeds",
        f"- unigram level (each masked validation token predicted by its training frequency): **{unigram:.3f}** "
        "nats; a run above it by ln 10 or non-finite is diverged",
        "",
    ]
    for family, part in result["summary"].items():
        lines += [f"## {family}", "", "### Tuned setting at each batch (best mean over seeds)", ""]
        lines += [
            "| batch | warmup searched | peak LR | warmup | MLM loss | below unigram | updates |",
            "|---|---|---:|---|---:|---:|---:|",
        ]
        for key, cell in part["tuned"].items():
            k, _, warmup = key.partition("/")
            lines.append(
                f"| {int(k) * meta['base_batch']} | {warmup or 'best of all'} | {cell['lr']:.4g}"
                f"{'' if cell['interior'] else ' (edge of the search)'} | {cell['warmup']} | "
                f"{_value(cell)} | {cell.get('below_unigram', math.nan):.3f} | {cell['updates']} |"
            )
        lines += ["", "### Each rule against the tuned setting (gap: the rule's loss − the tuned loss, per seed)", ""]
        lines += [
            "| rule | batch | peak LR | warmup | MLM loss | gap (nats) | per-seed gaps |",
            "|---|---|---:|---|---:|---:|---|",
        ]
        for rule, by_k in part["rules"].items():
            for k, cell in by_k.items():
                gap = f"{cell['gap']:+.3f} ± {cell['gap_spread']:.3f}" if "gap" in cell else "–"
                seeds = ", ".join(f"{g:+.3f}" for g in cell.get("gaps", []))
                lr = f"{cell['lr']:.4g}" if "lr" in cell else f"gain r̄ {cell['mean_gain']:.2g}, {cell['epochs']:.1f} ep"
                lines.append(
                    f"| {rule} | {int(k) * meta['base_batch']} | {lr} | {cell.get('warmup', 'AdaScale')} | "
                    f"{_value(cell)} | {gap} | {seeds} |"
                )
        lines += ["", "### Every setting run", ""]
        lines += ["| batch | peak LR | warmup (epochs) | MLM loss | per seed |", "|---|---:|---|---:|---|"]
        for cell in part["settings"]:
            values = ", ".join("diverged" if v is None else f"{v:.3f}" for v in cell["values"])
            lines.append(
                f"| {cell['batch']} | {cell['lr']:.4g} | {cell['warmup']} ({cell['warmup_epochs']:g}) | "
                f"{_value(cell)} | {values} |"
            )
        if part["b_simple"]:
            lines += [
                "",
                f"B_simple, plain gradients, first {NOISE_FRACTION:.0%} of the tuned base run's updates, per seed: "
                + ", ".join(f"{v:.0f}" for v in part["b_simple"].values())
                + " sequences.",
            ]
        lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot(out: Path, result: dict[str, Any]) -> list[str]:
    """The best LR against the batch (log axes) with the √k and k lines from the tuned base LR; each rule's gap to
    the tuned setting with its seed spread; the loss against the LR at every batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    meta, summary = result["meta"], result["summary"]
    families = list(summary)
    batches = [k * meta["base_batch"] for k in meta["ks"]]

    def batch_axis(axis) -> None:
        axis.set_xscale("log")
        axis.set_xticks(batches, labels=[str(b) for b in batches])
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.set_xlabel("global batch")

    def figure_per_family(name: str, draw: Any) -> str:
        figure, axes = plt.subplots(1, len(families), figsize=(5.5 * len(families), 4), squeeze=False)
        for axis, family in zip(axes[0], families, strict=True):
            draw(axis, family)
            axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out / name, dpi=110)
        plt.close(figure)
        return name

    def best_lr(axis, family: str) -> None:
        tuned = summary[family]["tuned"]
        for warmup, marker in (("fixed", "s"), ("scaled", "^"), (None, "o")):
            points = sorted(
                (int(key.partition("/")[0]) * meta["base_batch"], cell["lr"])
                for key, cell in tuned.items()
                if (key.partition("/")[2] or None) == warmup
            )
            if points:
                label = f"best, warmup {warmup}" if warmup else "best over the warmups searched"
                axis.plot(*zip(*points, strict=True), marker=marker, label=label, alpha=0.8)
        if "1" in tuned:
            base = tuned["1"]["lr"]
            axis.plot(batches, [base * math.sqrt(b / batches[0]) for b in batches], "k--", label="√k (LEGW)")
            axis.plot(batches, [base * b / batches[0] for b in batches], "k:", label="k (linear)")
        noise = summary[family]["b_simple"]
        if noise:
            axis.axvline(statistics.fmean(noise.values()), color="grey", linewidth=0.8, label="B_simple (early)")
        batch_axis(axis)
        axis.set(yscale="log", ylabel="peak LR", title=f"{family}: best LR")
        axis.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())

    def gaps(axis, family: str) -> None:
        for offset, (rule, by_k) in enumerate(summary[family]["rules"].items()):
            points = [(int(k), c) for k, c in by_k.items() if "gap" in c]
            if points:
                ks, cells = zip(*points, strict=True)
                xs = [k * meta["base_batch"] * (1 + 0.04 * offset) for k in ks]  # side by side, not on top
                gap, spread = [c["gap"] for c in cells], [c["gap_spread"] for c in cells]
                axis.errorbar(xs, gap, yerr=spread, marker="o", capsize=3, label=rule)
        axis.axhline(0.0, color="black", linewidth=0.8)
        batch_axis(axis)
        axis.set(ylabel="loss − tuned loss (nats)", title=f"{family}: gap to the tuned LR")

    def loss_against_lr(axis, family: str) -> None:
        for k in meta["ks"]:
            for warmup, style in (("fixed", "-"), ("scaled", "--")):
                points = sorted(
                    (c["lr"], c["mean"])
                    for c in summary[family]["settings"]
                    if c["k"] == k and c["warmup"] == warmup and "mean" in c
                )
                if points:
                    label = f"batch {k * meta['base_batch']}, warmup {warmup}"
                    axis.plot(*zip(*points, strict=True), style, marker="o", label=label)
        axis.axhline(result["unigram"], color="black", linestyle=":", label="unigram level")
        axis.set(xscale="log", xlabel="peak LR", ylabel="validation MLM loss", title=f"{family}: loss vs LR")
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())

    return [
        figure_per_family("bert_scaling_best_lr.png", best_lr),
        figure_per_family("bert_scaling_gaps.png", gaps),
        figure_per_family("bert_scaling_sweep.png", loss_against_lr),
    ]


def write_report(out: Path, result: dict[str, Any]) -> None:
    write_markdown(out / "bert_scaling.md", result)
    plot(out, result)


# ------------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = lb.runner_parser(__doc__.split("\n\n")[0], seeds=3)
    parser.add_argument(
        "--runs",
        type=Path,
        metavar="RUNS.json",
        help="start from these finished runs (the runs file a study writes after every round) and run what is missing",
    )
    args = parser.parse_args(argv)
    lb.check_runner_arguments(parser, args)
    if args.report is not None:
        write_report(args.report.parent, json.loads(args.report.read_text(encoding="utf-8")))
        return 0
    if args.runs is not None and not args.runs.is_file():
        parser.error(f"--runs must be a runs file written by this script, got {args.runs}")
    seeds = 1 if args.smoke and args.seeds == 3 else args.seeds
    args.out.mkdir(parents=True, exist_ok=True)
    study = Study(SMOKE_SEARCHES if args.smoke else SEARCHES, args.smoke, seeds, str(args.cache))
    if args.runs is not None:
        study.add(json.loads(args.runs.read_text(encoding="utf-8")))
    partial = args.out / "bert_scaling.runs.json"
    started = time.perf_counter()
    rounds = 0
    while cells := study.needed():
        rounds += 1
        print(f"round {rounds}: {len(cells)} runs on {args.workers} workers", flush=True)
        study.add(lb.run_cells(cells, args.workers, lambda line: print(line, flush=True)))
        partial.write_text(json.dumps(study.runs) + "\n", encoding="utf-8")
    seconds = time.perf_counter() - started
    size = study.size
    result = {
        "meta": {
            "environment": lb.environment(),
            "command": "python benchmarks/bert_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seconds": seconds,
            "rounds": rounds,
            "seeds": seeds,
            "base_batch": size.base_batch,
            "ks": list(size.ks),
            "epochs": size.epochs,
            "decay": lb._describe_decay(study.task.decay.to_dict()),
            "base_warmup_epochs": study.task.families["lamb"].base_warmup_epochs,
            "task": lb.describe_task(TASK, args.smoke, str(args.cache)),
            "searches": {
                name: asdict(search) | {"windows": {str(k): list(v) for k, v in search.windows.items()}}
                for name, search in study.searches.items()
            },
            "noise_fraction": NOISE_FRACTION,
        },
        "unigram": study.unigram,
        "summary": study.summary(),
        "runs": study.runs,
    }
    (args.out / "bert_scaling.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    write_report(args.out, result)
    print(f"done in {seconds / 60:.1f} min ({rounds} rounds): {args.out / 'bert_scaling.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
