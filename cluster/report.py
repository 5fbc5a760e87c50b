"""The report of a sweep folder: leaderboard, plots, best-config export and the final test.

Reads what the sweep left on disk (Tune's experiment state and per-trial results, the stored
``sweep.yaml``, each trial's run folder), so it works on a finished, crashed or still running
sweep and needs no Ray instance (except to train the final-test runs on Ray Train).

Writes into the sweep folder:
    report.md, leaderboard.csv          every trial: searched values, score, status, time
    plots/metric_vs_<field>.png         score against the LR (log x) per optimizer
    plots/learning_curves.png           the metric per report of the top trials
    plots/rung_survival.png             trials still running at each iteration (ASHA's cut)
    best/config.yaml, best/model.pt     the best config as a ready recipe, and its weights
    final/summary.json                  test metrics of the best config over few-shot seeds

The score of a trial is the best value of ``tune.metric`` over its evaluations (the checkpoint
fit keeps and exports), or, for k-fold trials, the mean over the folds it ran (± their sample
std). Every "±" here is a sample standard deviation (n-1).
"""

from __future__ import annotations

import csv
import math
import shutil
from dataclasses import dataclass, field, replace
from io import StringIO
from pathlib import Path
from typing import Any

from cluster.shared_epochs import FIELD, metric_at, shared_counts
from cluster.space import parse_space
from cluster.trial import sweep_prepared_cache
from cluster.tune import SWEEP_RECORD
from trainers import io
from trainers.config import RunConfig, from_dict
from trainers.errors import ConfigError
from trainers.metrics import STD_KIND

LOG_KINDS = ("loguniform", "qloguniform", "lograndint")


@dataclass
class TrialRow:
    trial_id: str
    status: str
    params: dict[str, Any]
    score: float | None
    std: float | None
    iterations: int
    time_s: float
    gpu_hours: float
    error: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Report:
    sweep_dir: Path
    cfg: RunConfig
    rows: list[TrialRow]
    fields: list[str]
    max_iterations: int
    final: dict[str, Any] | None = None
    best_export: Path | None = None
    plots: list[Path] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return self.cfg.tune.metric


# --------------------------------------------------------------------------------------------
# Reading the sweep


def load_sweep_config(sweep_dir: Path) -> RunConfig:
    path = Path(sweep_dir) / SWEEP_RECORD
    if not path.is_file():
        raise ConfigError(f"{sweep_dir}: not a sweep folder (no {SWEEP_RECORD}; sweeps live in "
                          f"<train.output_dir>/sweeps/<name>)")
    return from_dict(io.load_yaml(path), source=str(path))


def _history(trial_dir: Path) -> list[dict[str, Any]]:
    path = trial_dir / "result.json"  # Tune's JSON lines, one per report
    return io.read_jsonl(path) if path.is_file() else []


def _error_message(trial: Any) -> str:
    name = getattr(trial.run_metadata, "error_filename", None)
    if not name or not trial.path:
        return ""
    path = Path(trial.path) / name
    if not path.is_file():
        return "error (no error file)"
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    # the exception line is the last of the traceback; Ray wraps it as "...Error(Type): msg"
    msg = (lines[-1] if lines else "error")[:300]
    if trial.status != "ERROR":  # Tune keeps the error file of a failure a retry got past
        return f"retried after {trial.num_failures} failure(s), last: {msg}"
    return msg


def _score(history: list[dict[str, Any]], metric: str, mode: str,
           folds: bool) -> tuple[float | None, float | None]:
    values = [h[metric] for h in history if isinstance(h.get(metric), (int, float))
              and not math.isnan(h[metric])]
    if not values:
        return None, None
    if folds:
        return float(values[-1]), history[-1].get(f"{metric}_std")
    return float(max(values) if mode == "max" else min(values)), None


def collect_trials(sweep_dir: Path, cfg: RunConfig) -> list[TrialRow]:
    """One row per trial Tune knows of, best first (failed and unscored trials last)."""
    from ray.tune import ExperimentAnalysis

    from cluster.resources import TrialNeeds

    try:
        analysis = ExperimentAnalysis(str(sweep_dir))
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{sweep_dir}: no Tune experiment state to report on ({e})") from None
    gpus = TrialNeeds.from_config(cfg).gpus
    t = cfg.tune
    fields = list(t.space)
    counts, _ = shared_counts(cfg, parse_space(cfg))
    rows = []
    for trial in analysis.trials:
        history = _history(Path(trial.path))
        score, std = _score(history, t.metric, t.mode, cfg.data.folds > 1)
        last = history[-1] if history else {}
        time_s = float(last.get("time_total_s", 0.0))
        params = {k: trial.config.get(k) for k in fields}
        row = TrialRow(trial.trial_id, trial.status, params, score, std,
                       int(last.get("training_iteration", 0)), time_s, gpus * time_s / 3600.0,
                       _error_message(trial), history)
        # a trial that shared its epochs stands for one grid point per count
        rows += ([replace(row, trial_id=f"{trial.trial_id}@epochs={e}",
                          params={**params, FIELD: e}, score=last.get(metric_at(t.metric, e)),
                          std=last.get(metric_at(t.metric, e) + "_std"))
                  for e in counts] if counts else [row])
    sign = -1.0 if t.mode == "max" else 1.0
    # a failed trial may carry a score from the evaluations before its failure: still last;
    # ties go to the earlier grid point (shared epochs: the fewer epochs first, as Tune's grid
    # would have numbered them with train.epochs the last field)
    rows.sort(key=lambda r: (r.status == "ERROR", r.score is None, sign * (r.score or 0.0),
                             r.params.get(FIELD, 0) if counts else 0, r.trial_id))
    return rows


def pick_best(rows: list[TrialRow], cfg: RunConfig) -> tuple[TrialRow | None, str]:
    """The trial whose config the sweep hands on (export, final test) and why.

    The top score, unless ``tune.prefer`` names a default point that scored within the noise
    of the top: a few dozen validation examples rank configs mostly by chance, and a default
    known to be safe then beats a lucky one on unseen data."""
    scored = [r for r in rows if r.score is not None and r.status != "ERROR"]
    if not scored:
        return None, ""
    top, t = scored[0], cfg.tune
    default = next((r for r in scored if t.prefer and all(
        r.params.get(k) == v for k, v in t.prefer.items())), None)
    if default is None or default is top:
        return top, "top score"
    k = cfg.data.folds
    margin = t.prefer_margin
    if margin is None:
        margin = (math.sqrt(((top.std or 0.0) ** 2 + (default.std or 0.0) ** 2) / k)
                  if k > 1 else 0.0)
    gain = (top.score - default.score) * (1.0 if t.mode == "max" else -1.0)
    if gain > margin:
        return top, f"top score: beats tune.prefer by {gain:.4g} > margin {margin:.4g}"
    return default, f"tune.prefer: the top beats it by {gain:.4g} <= margin {margin:.4g}"


def cv_check(cv: float, cv_std: float | None, folds: int, test: float, *,
             n_val: int | None = None, mode: str = "max") -> dict[str, Any]:
    """Whether the chosen config's final test landed where its k-fold CV said it would.

    The tolerance is two standard errors of the CV mean: the folds' spread over sqrt(k), and,
    for a score in [0, 1] such as accuracy, the binomial noise of ``n_val`` validated examples
    (all folds together). "below" is the case to worry about: the CV liked a config that then
    did worse on unseen data. "above" is common and mostly harmless: each fold trained on
    (k-1)/k of the shots, the final run on all of them."""
    var = (cv_std or 0.0) ** 2 / max(folds, 1)
    if n_val and 0.0 <= cv <= 1.0:
        var += cv * (1.0 - cv) / n_val
    tolerance = 2.0 * math.sqrt(var)
    gap = (test - cv) * (1.0 if mode == "max" else -1.0)  # > 0: the test did better
    verdict = "holds" if abs(gap) <= tolerance else ("below" if gap < 0 else "above")
    return {"cv": cv, "cv_std": cv_std, "folds": folds, "n_val": n_val, "test": test,
            "gap": gap, "tolerance": tolerance, "verdict": verdict}


def cv_check_text(check: dict[str, Any], metric: str) -> str:
    c = check
    seen = (f"{c['folds']} folds" + (f", {c['n_val']} validated examples" if c["n_val"] else ""))
    head = (f"CV check (few-shot seed {c.get('seed', '?')}, the draw the CV split): the final "
            f"test's {metric} {c['test']:.4f} against the CV estimate "
            f"{c['cv']:.4f} ± {c['tolerance']:.4f} ({seen}): ")
    if c["verdict"] == "holds":
        return head + "the selection held"
    if c["verdict"] == "above":
        return head + (f"{c['gap']:.4f} better than CV said (the folds trained on fewer "
                       f"shots than the final run)")
    return head + (f"{-c['gap']:.4f} worse than CV said: the selection did not hold on unseen "
                   f"data; more folds (data.folds) or a tune.prefer default make it steadier")


# --------------------------------------------------------------------------------------------
# Leaderboard


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4f}".rstrip("0")
    return "" if v is None else str(v)


def _score_text(r: TrialRow) -> str:
    if r.score is None:
        return "-"
    return f"{r.score:.4f}" + (f" ± {r.std:.4f}" if r.std is not None else "")


def leaderboard_columns(rep: Report) -> list[str]:
    return ["rank", "trial", *rep.fields, rep.metric, "iterations", "status", "time_s",
            "gpu_hours", "error"]


def leaderboard_markdown(rep: Report, top: int | None = None) -> str:
    cols = leaderboard_columns(rep)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for i, r in enumerate(rep.rows[:top] if top else rep.rows, 1):
        cells = [str(i), r.trial_id, *(_fmt(r.params.get(f)) for f in rep.fields),
                 _score_text(r), str(r.iterations), r.status, f"{r.time_s:.1f}",
                 f"{r.gpu_hours:.4f}", r.error.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def leaderboard_csv(rep: Report) -> str:
    out = StringIO()
    w = csv.writer(out)
    w.writerow([*leaderboard_columns(rep), f"{rep.metric}_std"])
    for i, r in enumerate(rep.rows, 1):
        w.writerow([i, r.trial_id, *(r.params.get(f) for f in rep.fields),
                    "" if r.score is None else r.score, r.iterations, r.status,
                    round(r.time_s, 3), round(r.gpu_hours, 6), r.error,
                    "" if r.std is None else r.std])
    return out.getvalue()


# --------------------------------------------------------------------------------------------
# Plots


def _log_scale(cfg: RunConfig, name: str) -> bool:
    spec = cfg.tune.space.get(name)
    texts = [v for k, v in spec.items() if k != "by"] if isinstance(spec, dict) else [spec]
    return any(str(t).strip().lower().startswith(LOG_KINDS) for t in texts)


def _numeric_field(rep: Report) -> str | None:
    if "optim.lr" in rep.fields:
        return "optim.lr"
    for f in rep.fields:
        if all(isinstance(r.params.get(f), (int, float)) and not isinstance(r.params.get(f), bool)
               for r in rep.rows if r.params.get(f) is not None):
            return f
    return None


def _group_field(rep: Report, x: str) -> str | None:
    if "optim.name" in rep.fields and x != "optim.name":
        return "optim.name"
    return next((f for f in rep.fields if f != x and not isinstance(
        next((r.params[f] for r in rep.rows if r.params.get(f) is not None), 0.0), float)), None)


def plot_metric_vs_field(rep: Report, out: Path) -> Path | None:
    import matplotlib.pyplot as plt

    x = _numeric_field(rep)
    scored = [r for r in rep.rows if r.score is not None]
    if x is None or not scored:
        return None
    group = _group_field(rep, x)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = sorted({str(r.params.get(group)) for r in scored}) if group else ["all"]
    for i, g in enumerate(groups):
        rows = [r for r in scored if not group or str(r.params.get(group)) == g]
        color = f"C{i % 10}"
        full = [r for r in rows if r.iterations >= rep.max_iterations]
        cut = [r for r in rows if r.iterations < rep.max_iterations]
        ax.scatter([r.params[x] for r in full], [r.score for r in full], color=color,
                   label=f"{group}={g}" if group else "trials", s=40, zorder=3)
        ax.scatter([r.params[x] for r in cut], [r.score for r in cut], facecolors="none",
                   edgecolors=color, s=40, zorder=3)
    if _log_scale(rep.cfg, x):
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(f"{rep.metric} ({'fold mean' if rep.cfg.data.folds > 1 else 'best'})")
    ax.set_title(f"{rep.cfg.tune.name or rep.cfg.name}: {rep.metric} vs {x} "
                 f"(hollow = stopped early)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = out / f"metric_vs_{x.replace('.', '_')}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_learning_curves(rep: Report, out: Path, top: int = 5) -> Path | None:
    import matplotlib.pyplot as plt

    rows = [r for r in rep.rows if r.score is not None][:top]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(rows):
        # the final row carries the best value under the metric's name, the curve its own
        pts = [(h["training_iteration"], h.get(f"last_{rep.metric}", h[rep.metric]))
               for h in r.history if isinstance(h.get(rep.metric), (int, float))]
        if not pts:
            continue
        label = ", ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in r.params.items())
        ax.plot(*zip(*pts), marker="o", ms=3, color=f"C{i}", label=f"#{i + 1} {label}")
    ax.set_xlabel("fold" if rep.cfg.data.folds > 1 else "evaluation (epoch)")
    ax.set_ylabel(rep.metric)
    ax.set_title(f"learning curves of the top {len(rows)} trials")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = out / "learning_curves.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rung_survival(rep: Report) -> list[tuple[int, int]]:
    """(iteration, trials that reached it) for 1..max iteration reached."""
    most = max((r.iterations for r in rep.rows), default=0)
    return [(i, sum(1 for r in rep.rows if r.iterations >= i)) for i in range(1, most + 1)]


def plot_rung_survival(rep: Report, out: Path) -> Path | None:
    import matplotlib.pyplot as plt

    counts = rung_survival(rep)
    if not counts:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([c[0] for c in counts], [c[1] for c in counts], color="C0")
    t = rep.cfg.tune
    if t.scheduler == "asha":
        rung = t.grace_period
        while rung < rep.max_iterations:
            ax.axvline(rung + 0.5, color="C3", ls="--", lw=1)
            rung = math.ceil(rung * t.reduction_factor)
        ax.plot([], [], color="C3", ls="--", label="ASHA rung (cut after)")
        ax.legend(fontsize=8)
    for i, n in counts:
        ax.text(i, n, str(n), ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("iteration (report)")
    ax.set_ylabel("trials alive")
    ax.set_title(f"trials still running at each iteration ({len(rep.rows)} trials, "
                 f"scheduler {t.scheduler})")
    ax.set_xticks([c[0] for c in counts])
    path = out / "rung_survival.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOTS = (plot_metric_vs_field, plot_learning_curves, plot_rung_survival)


# --------------------------------------------------------------------------------------------
# Best config export and the final test


def best_config(rep: Report, row: TrialRow) -> RunConfig:
    """The recipe the best trial trained, as a ready-to-run recipe (test split on)."""
    return rep.cfg.replace({**row.params, "tune.space": {}, "tune.prefer": {}},
                           source=f"best trial {row.trial_id}")


def export_best(rep: Report) -> Path | None:
    best, why = pick_best(rep.rows, rep.cfg)
    if best is None:
        return None
    out = rep.sweep_dir / "best"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    best_config(rep, best).save(out / "config.yaml")
    run_dir = rep.sweep_dir / "runs" / best.trial_id
    ckpts = run_dir / "checkpoints"
    candidates = [ckpts / "final" / "model.pt"]
    pointer = ckpts / "best"
    if pointer.is_file():
        candidates.append(ckpts / pointer.read_text().strip() / "model.pt")
    model = next((c for c in candidates if c.is_file()), None)
    if model is not None:
        shutil.copy2(model, out / "model.pt")
    if (run_dir / "labels.json").is_file():  # class names: best/ loads as a model on its own
        shutil.copy2(run_dir / "labels.json", out / "labels.json")
    io.write_json(out / "trial.json",
                  {"trial_id": best.trial_id, "params": best.params, "score": best.score,
                   "std": best.std, "chosen": why, "model": str(model) if model else None})
    return out


def final_config(cfg: RunConfig, sweep_dir: Path) -> RunConfig:
    """A k-fold sweep's chosen config as its final run trains it: on all K shots, and with
    tune.refit=soup from the mean of its folds' preparations, which the sweep's trials left
    in <sweep>/prepared (another draw prepares its folds anew)."""
    changes: dict[str, Any] = {"data.folds": 0, "data.fold": 0}
    if cfg.tune.refit == "soup":
        changes.update({"model.soup_folds": cfg.data.folds,
                        **sweep_prepared_cache(cfg, sweep_dir)})
    return cfg.replace(changes, source="final run")


def final_evaluation(rep: Report, seeds: int) -> dict[str, Any] | None:
    """Train the best config on the full K-shot set of seeds 0..n-1; test metrics mean ± std.

    The only place a sweep reads the test split. k-fold is turned off (all K shots train).
    Results are cached in final/summary.json for the same best trial and seeds.
    """
    from cluster.run import evaluate_seeds

    best, _ = pick_best(rep.rows, rep.cfg)
    if best is None or seeds <= 0:
        return None
    out = rep.sweep_dir / "final"
    cache = out / "summary.json"
    if cache.is_file():
        cached = io.read_json(cache)
        if (cached.get("trial_id"), cached.get("seeds"), cached.get("std")) == \
                (best.trial_id, seeds, STD_KIND):
            return cached

    def announce(seed: int) -> dict[str, Any]:
        print(f"final evaluation: best config, few-shot seed {seed} ...", flush=True)
        return {"train.run_name": f"seed-{seed}"}

    cfg = final_config(best_config(rep, best), rep.sweep_dir).replace(
        {"train.test": True, "train.progress": False,
         "train.output_dir": str(out), "scaling.storage_path": str(out / "train")},
        source="final evaluation")
    results = evaluate_seeds(cfg, seeds, overrides=announce, source="final evaluation")
    per_seed = [{k: v for k, v in row.items() if k == "seed" or k.startswith("test/")}
                for row in results.per_seed]
    summary = {"trial_id": best.trial_id, "params": best.params, "seeds": seeds,
               "per_seed": per_seed, "test": results.summary, "std": results.std_kind}
    # the CV split one draw (the sweep's data.seed): its final run is the like-for-like test
    test_key, draw = rep.metric.replace("val/", "test/", 1), rep.cfg.data.seed
    tested = next((row.get(test_key) for row in per_seed if row["seed"] == draw), None)
    if rep.cfg.data.folds > 1 and best.score is not None and isinstance(tested, (int, float)):
        summary["cv_check"] = {**cv_check(best.score, best.std, rep.cfg.data.folds, tested,
                                          n_val=_validated(out / f"seed-{draw}"),
                                          mode=rep.cfg.tune.mode), "seed": draw}
    io.write_json(cache, summary)
    return summary


def _validated(run_dir: Path) -> int | None:
    """How many examples the CV folds validated in all: the few-shot set the final run trained
    on (its labels.json lists them), which the folds split between them."""
    labels = run_dir / "labels.json"
    if not labels.is_file():
        return None
    sources = io.read_json(labels).get("train_sources")
    return len(sources) if isinstance(sources, list) and sources else None


# --------------------------------------------------------------------------------------------
# Putting it together


def write_report(sweep_dir: str | Path, *, final: bool = True) -> Report:
    """Write every part of the report into the sweep folder and return it."""
    import matplotlib

    matplotlib.use("Agg")
    from cluster.trial import expected_iterations

    sweep_dir = Path(sweep_dir).resolve()
    cfg = load_sweep_config(sweep_dir)
    rows = collect_trials(sweep_dir, cfg)
    rep = Report(sweep_dir, cfg, rows, list(cfg.tune.space), expected_iterations(cfg))
    if cfg.data.folds <= 1:  # the max is what a full trial reports; epochs may end early
        rep.max_iterations = max([r.iterations for r in rows] + [1])
    plots = sweep_dir / "plots"
    plots.mkdir(exist_ok=True)
    rep.plots = [p for p in (fn(rep, plots) for fn in PLOTS) if p is not None]
    rep.best_export = export_best(rep)
    if final:
        rep.final = final_evaluation(rep, cfg.tune.final_seeds)
    io.write_text(sweep_dir / "leaderboard.csv", leaderboard_csv(rep))
    io.write_text(sweep_dir / "report.md", report_markdown(rep))
    return rep


def final_text(rep: Report) -> str:
    if not rep.final:
        return "final test: not run"
    stats = rep.final["test"]
    key = rep.metric.replace("val/", "test/", 1)
    order = [key] + [k for k in stats if k != key]
    parts = [f"{k} {stats[k]['mean']:.4f} ± {stats[k]['std']:.4f}" for k in order if k in stats]
    text = (f"final test of the best config (trial {rep.final['trial_id']}, "
            f"{rep.final['seeds']} few-shot seed(s), mean ± {STD_KIND}): " + "; ".join(parts))
    if rep.final.get("cv_check"):
        text += "\n" + cv_check_text(rep.final["cv_check"], key)
    return text


def report_markdown(rep: Report) -> str:
    t = rep.cfg.tune
    done = sum(1 for r in rep.rows if r.status == "TERMINATED")
    failed = [r for r in rep.rows if r.status == "ERROR"]
    lines = [f"# Sweep {t.name or rep.cfg.name}", "",
             f"{len(rep.rows)} trials ({done} finished, {len(failed)} failed), search "
             f"{t.search}, scheduler {t.scheduler}, metric {t.metric} ({t.mode}). "
             f"GPU-hours in all: {sum(r.gpu_hours for r in rep.rows):.4f}.", "",
             "## Final test", "", final_text(rep), ""]
    if rep.final:
        lines += ["| seed | " + " | ".join(k for k in rep.final["test"]) + " |",
                  "|---|" + "---|" * len(rep.final["test"])]
        for m in rep.final["per_seed"]:
            lines.append(f"| {m['seed']} | " + " | ".join(f"{m.get(k, float('nan')):.4f}"
                                                          for k in rep.final["test"]) + " |")
        lines.append("")
    lines += ["## Leaderboard", "", leaderboard_markdown(rep), ""]
    if rep.best_export:
        has_model = (rep.best_export / "model.pt").is_file()
        best, why = pick_best(rep.rows, rep.cfg)
        lines += ["## Best config", "", f"`{rep.best_export / 'config.yaml'}`" +
                  (f" and `{rep.best_export / 'model.pt'}`" if has_model else
                   " (no single checkpoint: k-fold trials, or checkpoints off)") +
                  (f"; trial {best.trial_id}, chosen by {why}" if best else ""), ""]
    lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in rep.plots]
    return "\n".join(lines) + "\n"


def summary_text(rep: Report, top: int = 5) -> str:
    return "\n".join([
        f"\nleaderboard (top {min(top, len(rep.rows))} of {len(rep.rows)}), "
        f"{rep.cfg.tune.metric}:", leaderboard_markdown(rep, top), "", final_text(rep),
        f"report: {rep.sweep_dir / 'report.md'}"])
