"""The command layer: the only place that parses arguments, prints for people and picks exit
codes. Each module holds ``add_<name>_args(parser)`` and ``run_<name>(args) -> int`` for its
commands; ``launch.py`` imports a module only when its command runs (or builds its --help),
and the modules import the library (cluster, trainers) inside ``run_*``, so --help and config
errors stay instant.
"""

# command -> (module under commands/, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "Train one run: locally, or on Ray Train when scaling.num_workers > 0"),
    "seeds": ("train", "Train once per few-shot seed and report mean ± std of test metrics"),
    "demo": ("train", "The embedded default: a small MiniLM sweep on SST-2, then its report"),
    "tune": ("tune", "Run a Ray Tune sweep described by the recipe's tune section"),
    "report": ("tune", "Leaderboard, plots and best-config export of a sweep folder"),
    "up": ("local", "Keep a local Ray instance running: later commands connect to it"),
    "down": ("local", "Stop the local Ray instance that `up` keeps"),
    "submit": ("jobs", "Submit a recipe to a running Ray cluster (Ray Jobs API)"),
    "status": ("jobs", "Status of a submitted job"),
    "logs": ("jobs", "Logs of a submitted job (--follow to tail)"),
    "stop": ("jobs", "Stop a submitted job"),
    "list": ("jobs", "Jobs submitted from this machine"),
    "augment-preview": ("augment_preview", "Write a grid (images) or table (text) of augmentations"),
    "predict": ("predict", "Labels and probabilities for new texts or images"),
    "evaluate": ("evaluate", "Metrics and a confusion matrix on labelled data"),
    "export": ("export", "Write a model as an HF folder, ONNX or TorchScript"),
    "serve": ("serve", "An HTTP JSON endpoint on Ray Serve (POST /predict)"),
}
