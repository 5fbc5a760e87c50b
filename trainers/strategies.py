"""Fine-tuning strategies, keyed by ``model.strategy``: what happens before the main loop.

A strategy prepares the model before ``fit`` fine-tunes it end to end:

- ``full``: nothing; the head starts fresh.
- ``lp-ft``: fit a linear probe (multinomial logistic regression) on the frozen embeddings of
  the training split and start the head from it (Kumar et al. 2022, "LP-FT"): fine-tuning then
  starts from a head that already fits, so early gradients do not distort the features.
- ``contrastive``: a SetFit-style stage first trains the body on same-class / other-class pairs
  (cosine-similarity loss on the embeddings), then the head is the probe fitted on the new
  embeddings. The stage runs through ``create_engine``, so it uses plain / DDP / DeepSpeed
  exactly as the main loop does.

The embeddings are whatever the head receives (a forward pre-hook on the head module), so the
probe works for every model in the factory. Everything here is deterministic for a seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from trainers.batches import Batcher, epoch_order, inference_batches, step_seed
from trainers.config import RunConfig, Schedule
from trainers.data import Split
from trainers.engines import autocast_dtype, create_engine, world
from trainers.errors import ConfigError
from trainers.models import BuiltModel
from trainers.registry import Registry, params_of
from trainers.steps import train_step

Prepare = Callable[[RunConfig, BuiltModel, Split, torch.device], None]
PROBE_C = 1.0  # inverse L2 strength of the probe, as scikit-learn's / SetFit's default head


PREPARE_ARGS = ("cfg", "built", "train", "device")  # what every strategy gets; the rest: params


class Strategy:
    """What a strategy may change in ``fit``; the defaults are plain supervised fine-tuning.

    ``prepare`` runs once before the loop (not on resume: the checkpoint carries its result);
    ``batches`` gives one epoch's micro batches as index lists with their targets (None: the
    split's labels); ``training`` wraps each training forward; ``before_evaluation`` runs
    before the model is scored.
    """

    def __init__(self, prepare: Prepare | None = None, reusable: bool = False,
                 refit_head: Prepare | None = None):
        self._prepare = prepare
        # prepare depends on config, data, weights and RNG alone (trainers.prepared)
        self.reusable = reusable
        # fits the head alone on the current body (a probe), for model.soup_folds; None: the
        # strategy's head is not a function of the body and the shots
        self.refit_head = refit_head

    def prepare(self, cfg: RunConfig, built: BuiltModel, train: Split,
                device: torch.device) -> None:
        if self._prepare is not None:
            self._prepare(cfg, built, train, device)

    def setup(self, built: BuiltModel) -> None:
        """Runs on every start, resumed or not, before the engine wraps the model."""

    def micro_batches_per_epoch(self, n: int, micro_bs: int, world_size: int) -> int | None:
        """None: ceil(examples per rank / micro batch), the loop's own count."""
        return None

    def batches(self, cfg: RunConfig, train: Split, epoch: int, rank: int, world_size: int,
                ) -> list[tuple[list[int], torch.Tensor | None]] | None:
        return None  # the loop's shuffled micro batches

    @contextmanager
    def training(self, built: BuiltModel) -> Iterator[None]:
        yield

    def before_evaluation(self, cfg: RunConfig, built: BuiltModel, train: Split,
                          device: torch.device) -> None:
        pass

    __call__ = prepare


# an entry is a prepare function ``fn(cfg, built, train, device, *, <params>)`` or a Strategy
# subclass whose ``__init__`` takes the params; either way its keyword parameters are the
# allowed ``model.strategy_params.<name>``
STRATEGIES: Registry[Callable[..., Any]] = Registry("strategy", "model.strategy")


def register_strategy(name: str, ranges: dict[str, tuple[float | None, float | None]] | None = None,
                      *, reusable: bool = False, probe: bool = False
                      ) -> Callable[[Callable], Callable]:
    """``@register_strategy("x")`` on a prepare function or a Strategy subclass. ``reusable``:
    its preparation depends on nothing but the config, the train split, the initial weights
    and the random state, so a sweep's runs may share it (trainers.prepared); ``probe``: it
    leaves the probe of the prepared body as the head (lp_ft refits it, e.g. on a soup)."""
    register = STRATEGIES.register(name, ranges=ranges)

    def add(entry: Callable) -> Callable:
        if reusable:
            entry.reusable = True  # type: ignore[attr-defined]
        if probe:
            entry.probe = True  # type: ignore[attr-defined]
        return register(entry)
    return add


def create_strategy(name: str) -> Callable[..., Any]:
    return STRATEGIES.get(name)


def strategy_params(cfg: RunConfig, name: str | None = None) -> dict[str, Any]:
    """The params of strategy ``name`` (default: model.strategy), checked against its
    signature; the entries for other strategies are checked too (a sweep may pick them)."""
    name = name or cfg.model.strategy
    options = cfg.model.strategy_params
    for key in options:
        STRATEGIES.get(key, field="model.strategy_params")
        if key != name:
            STRATEGIES.check_params(key, options[key], field=f"model.strategy_params.{key}",
                                    skip=PREPARE_ARGS)
    return STRATEGIES.check_params(name, options.get(name, {}),
                                   field=f"model.strategy_params.{name}", skip=PREPARE_ARGS)


def make_strategy(name: str, params: dict[str, Any] | None = None) -> Strategy:
    """Strategy ``name`` with ``params`` (checked against its signature) as a Strategy."""
    entry = STRATEGIES.get(name)
    params = STRATEGIES.check_params(name, dict(params or {}),
                                     field=f"model.strategy_params.{name}", skip=PREPARE_ARGS)
    if isinstance(entry, type) and issubclass(entry, Strategy):
        try:
            return entry(**params)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.strategy_params.{name}: {e}") from None
    refit = (partial(lp_ft, label_names=params.get("label_names", "none"))
             if getattr(entry, "probe", False) else None)
    return Strategy(partial(entry, **params), reusable=getattr(entry, "reusable", False),
                    refit_head=refit)


def build_strategy(cfg: RunConfig) -> Strategy:
    """model.strategy with its model.strategy_params, ready for ``fit``."""
    return make_strategy(cfg.model.strategy, strategy_params(cfg))


def with_rounds(cfg: RunConfig, rounds: int, field: str) -> RunConfig | None:
    """``cfg`` whose strategy runs ``rounds`` more pair rounds (the setting ``field`` asks for:
    the soup's top-up, self-training's), or None when there are none: ``rounds`` is 0, or the
    strategy has no rounds (lp-ft)."""
    if not rounds or "iterations" not in params_of(STRATEGIES.get(cfg.model.strategy)):
        return None
    return cfg.replace({f"model.strategy_params.{cfg.model.strategy}.iterations": rounds},
                       source=field)


def apply_strategy(cfg: RunConfig, built: BuiltModel, train: Split, device: torch.device) -> None:
    """Prepare ``built`` with model.strategy and its params (before fit fine-tunes it)."""
    build_strategy(cfg).prepare(cfg, built, train, device)


# --------------------------------------------------------------------------------------------
# Head access, embeddings and the linear probe


def head_module(built: BuiltModel) -> nn.Linear:
    """The model's fresh linear head (named by the first of ``head_prefixes``)."""
    name = built.head_prefixes[0].rstrip(".")
    head = built.module.get_submodule(name)
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"model.strategy: the head {name!r} is a {type(head).__name__}; "
                          f"probe strategies need a linear head")
    return head


@contextmanager
def swapped_head(built: BuiltModel, replacement: nn.Module) -> Iterator[nn.Linear]:
    """Temporarily put ``replacement`` where the head is (the model then outputs embeddings)."""
    name = built.head_prefixes[0].rstrip(".")
    parent_name, _, attr = name.rpartition(".")
    parent = built.module.get_submodule(parent_name) if parent_name else built.module
    head = head_module(built)
    setattr(parent, attr, replacement)
    try:
        yield head
    finally:
        setattr(parent, attr, head)


def batch_inputs(batcher, split: Split, idx: list[int], prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in batcher.inputs(split, idx).items()}


@torch.no_grad()
def embed_split(forward: Callable[..., torch.Tensor], batcher, split: Split,
                batch_size: int) -> torch.Tensor:
    """Embeddings of every example of ``split`` through ``forward`` (float32, on the CPU)."""
    batches, restore = inference_batches(split.inputs, batch_size)
    return torch.cat([forward(**batcher.inputs(split, idx)).float().cpu()
                      for idx in batches])[restore]


@torch.no_grad()
def head_inputs(built: BuiltModel, batcher, split: Split, batch_size: int) -> torch.Tensor:
    """What the head receives for each example (eval mode: no dropout)."""
    was_training = built.module.training
    built.module.eval()
    dtype = autocast_dtype(batcher.cfg, batcher.device)  # as the engine's forward runs
    with swapped_head(built, nn.Identity()), torch.autocast(
            batcher.device.type, dtype=dtype, enabled=dtype is not None):
        feats = embed_split(built.module, batcher, split, batch_size)
    built.module.train(was_training)
    return feats


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int,
                     c: float = PROBE_C, prior: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, L2 on the weights (scikit-learn's objective / (C n)).

    Full-batch L-BFGS in float64: deterministic, and the same on every rank. ``prior``
    [classes, D]: the L2 pulls the weights towards it instead of towards zero (and they start
    there), so with few examples the fit stays near what the prior already knows.
    """
    x = x.double()
    w0 = (torch.zeros(num_classes, x.shape[1], dtype=torch.float64) if prior is None
          else prior.double().clone())
    w = w0.clone().requires_grad_(True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20,
                            line_search_fn="strong_wolfe")
    lam = 1.0 / (2.0 * c * len(y))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + lam * ((w - w0) ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().float(), b.detach().float()


@torch.no_grad()
def set_head(head: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    head.weight.copy_(weight.to(head.weight.device, head.weight.dtype))
    if head.bias is not None:
        head.bias.copy_(bias.to(head.bias.device, head.bias.dtype))


LabelNames = Literal["none", "prior", "anchors"]
PRIOR_SCALES = (0.0, *(float(10 ** (k / 8)) for k in range(-8, 25)))  # 0, 0.1 ... 1000
PRIOR_WEIGHTS = (0.0, 0.5, 1.0)


def zero_shot_prior(feats: torch.Tensor, labels: torch.Tensor, names: torch.Tensor
                    ) -> torch.Tensor:
    """The zero-shot classifier the class names give, as far as the shots support it.

    Its rows are the names' unit embeddings times the one scale (of 0, 0.1 ... 1000) whose
    softmax fits the labelled examples best, times the weight (0, 1/2 or 1) under which the
    probe predicts held-out shots best (log loss, 8-fold CV on the shots: cheap, the probe
    fits in milliseconds).
    Names that mislead ("objective" for plain facts) get weight 0: the plain probe."""
    e = F.normalize(names.double(), dim=-1)
    cos = feats.double() @ e.T
    losses = [float(F.cross_entropy(s * cos, labels)) for s in PRIOR_SCALES]
    calibrated = PRIOR_SCALES[losses.index(min(losses))] * e
    n, num_classes = len(labels), len(e)
    fold = torch.arange(n) % min(n, 8)
    scores = []
    for weight in PRIOR_WEIGHTS:
        held_out = 0.0
        for k in fold.unique():
            out = fold == k
            w, b = fit_linear_probe(feats[~out], labels[~out], num_classes,
                                    prior=weight * calibrated)
            held_out += float(F.cross_entropy(feats[out].double() @ w.T.double() + b.double(),
                                              labels[out], reduction="sum"))
        scores.append(held_out)
    return PRIOR_WEIGHTS[scores.index(min(scores))] * calibrated


def class_names(train: Split) -> Split:
    """The class names as a split of texts (label i = name i), to embed like examples."""
    if not train.classes or not isinstance(train.inputs, list):
        raise ConfigError("label_names: needs a text dataset with class names (data.format="
                          "text; data.label_text_column names the column)")
    return Split(list(train.classes), torch.arange(len(train.classes)))


def probe_head(cfg: RunConfig, built: BuiltModel, train: Split, device: torch.device,
               feats: torch.Tensor | None = None, names: torch.Tensor | None = None,
               label_names: LabelNames = "none") -> None:
    """Fit the probe on the head's inputs and copy it into the head. With ``names``, the class
    names' embeddings: ``prior`` pulls the probe towards their zero-shot classifier,
    ``anchors`` adds each name as one more labelled example of its class."""
    if feats is None:
        built.module.to(device)
        feats = head_inputs(built, Batcher(cfg, built, device), train, cfg.train.eval_batch_size)
    num_classes = head_module(built).out_features
    labels, prior = train.labels, None
    if names is not None and label_names == "prior":
        prior = zero_shot_prior(feats, labels, names)
    elif names is not None and label_names == "anchors":
        feats, labels = torch.cat([feats, names]), torch.cat([labels, torch.arange(len(names))])
    w, b = fit_linear_probe(feats, labels, num_classes, prior=prior)
    set_head(head_module(built), w, b)


@register_strategy("full")
def full(cfg: RunConfig, built: BuiltModel, train: Split, device: torch.device) -> None:
    """Fine-tune everything from a freshly initialised head."""


@register_strategy("lp-ft", reusable=True, probe=True)
def lp_ft(cfg: RunConfig, built: BuiltModel, train: Split, device: torch.device, *,
          label_names: LabelNames = "none") -> None:
    """Linear probe on frozen embeddings first, then the main loop fine-tunes from that head.

    ``label_names``: ``prior`` or ``anchors``, how the class names help the probe (probe_head)."""
    names = None
    if label_names != "none":
        built.module.to(device)
        names = head_inputs(built, Batcher(cfg, built, device), class_names(train),
                            cfg.train.eval_batch_size)
    probe_head(cfg, built, train, device, names=names, label_names=label_names)


# --------------------------------------------------------------------------------------------
# The contrastive (SetFit-style) stage


PairSampling = Literal["anchored", "unique"]


def make_pairs(labels: list[int], iterations: int, seed: int,
               sampling: PairSampling = "anchored") -> list[tuple[int, int, float]]:
    """``anchored``: each round pairs every example with one same-class (1.0) and one
    other-class (0.0) one, drawn with replacement. ``unique``: as many same-class and as many
    other-class pairs, but drawn from the distinct unordered pairs, each once before any
    repeats (SetFit's unique pairs, on a budget that grows with the shots, not their square)."""
    if sampling == "unique":
        return unique_pairs(labels, iterations, seed)
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    pairs = []
    for _ in range(iterations):
        for i, y in enumerate(labels):
            same = [j for j in by_class[int(y)] if j != i] or [i]
            other = [j for c, idx in by_class.items() if c != int(y) for j in idx]
            pairs.append((i, rng.choice(same), 1.0))
            if other:
                pairs.append((i, rng.choice(other), 0.0))
    rng.shuffle(pairs)
    return pairs


def unique_pairs(labels: list[int], iterations: int, seed: int) -> list[tuple[int, int, float]]:
    rng = random.Random(seed)
    n = len(labels)
    same = [(i, j) for i in range(n) for j in range(i + 1, n) if labels[i] == labels[j]]
    other = [(i, j) for i in range(n) for j in range(i + 1, n) if labels[i] != labels[j]]
    pairs = []
    for pool, target in ((same, 1.0), (other, 0.0)):
        drawn: list[tuple[int, int]] = []
        while pool and len(drawn) < iterations * n:  # whole shuffled passes, then cut
            drawn += rng.sample(pool, len(pool))
        pairs += [(i, j, target) for i, j in drawn[:iterations * n]]
    rng.shuffle(pairs)
    return pairs


ContrastiveLoss = Literal["cosine", "supcon"]


class PairModel(nn.Module):
    """The body alone (head swapped out): embeddings of ``a_*`` inputs, or a contrastive loss.

    forward(a_..., left, right, target) -> MSE between cos(emb[left], emb[right]) and the
    target (SetFit's CosineSimilarityLoss), where ``a_`` holds each text of the pairs once;
    forward(a_..., labels) -> the supervised contrastive loss of the batch; forward(a_...) ->
    the embeddings. Only the body's parameters live here, so DDP sees no unused parameters.
    """

    def __init__(self, body: nn.Module, temperature: float = 0.05):
        super().__init__()
        self.body = body
        self.temperature = temperature

    def forward(self, target: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                left: torch.Tensor | None = None, right: torch.Tensor | None = None,
                **inputs: torch.Tensor) -> torch.Tensor:
        emb = self.body(**{k[2:]: v for k, v in inputs.items() if k.startswith("a_")})
        if labels is not None:
            return supcon_loss(emb, labels, self.temperature)
        if target is None:
            return emb
        cos = F.cosine_similarity(emb[left].float(), emb[right].float(), dim=-1)
        return F.mse_loss(cos, target.float())


def supcon_loss(emb: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) over one batch: every example is pulled
    towards all same-class examples of the batch and pushed from the rest at once, instead of
    one partner per pair. Examples without a same-class partner in the batch only serve as
    negatives."""
    z = F.normalize(emb.float(), dim=-1)
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logp = (z @ z.T / temperature).masked_fill(self_mask, float("-inf")).log_softmax(dim=1)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    count = positive.sum(dim=1)
    anchors = count > 0
    if not bool(anchors.any()):
        return z.sum() * 0.0  # keeps the graph (and DDP's reducer) whole
    per_anchor = -logp.masked_fill(~positive, 0.0).sum(dim=1)[anchors] / count[anchors]
    return per_anchor.mean()


def supcon_batches(labels: list[int], iterations: int, batch_size: int, seed: int
                   ) -> list[list[int]]:
    """Example batches of ``2 * batch_size`` for the supcon loss: as many steps, each with as
    many example slots, as the pair loss's ``iterations`` rounds (every example fills about 4
    slots a round there: anchor of 2 pairs, partner of ~2). The pair loss encodes a text once
    per batch however many of its slots it fills, so on few examples it encodes fewer."""
    rng = random.Random(seed)
    seq: list[int] = []
    for _ in range(4 * iterations):
        seq += rng.sample(range(len(labels)), len(labels))
    size = 2 * batch_size
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def token_embeddings(built: BuiltModel) -> nn.Module:
    """The token-embedding table of a text model (the first submodule with one)."""
    for module in built.module.modules():
        get = getattr(module, "get_input_embeddings", None)
        table = get() if callable(get) else None
        if isinstance(table, nn.Module):
            return table
    raise ConfigError("model.strategy_params.contrastive.freeze_embeddings: this model has no "
                      "token-embedding table (a text model's option)")


@contextmanager
def frozen_token_table(built: BuiltModel, freeze: bool) -> Iterator[None]:
    """The token-embedding table frozen inside the block when ``freeze`` (restored after)."""
    params = list(token_embeddings(built).parameters()) if freeze else []
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, was):
            p.requires_grad_(flag)


def contrastive_stage(cfg: RunConfig, built: BuiltModel, train: Split, device: torch.device,
                      *, iterations: int = 5, lr: float = 2e-5, loss: ContrastiveLoss = "cosine",
                      temperature: float = 0.05, also: Split | None = None,
                      freeze_embeddings: bool = False, dropout: bool = True,
                      batch_size: int | None = None, schedule: Schedule | None = None,
                      warmup: float | None = None, sampling: PairSampling = "anchored"
                      ) -> tuple[list[float], torch.Tensor, torch.Tensor | None]:
    """Train the body with the contrastive ``loss``; the per-step losses, the new train
    embeddings and the new embeddings of ``also`` (e.g. the class names), when given.

    ``freeze_embeddings``: the token table (half of MiniLM's weights) stays as pretrained, so
    a step neither builds its dense gradient nor updates it; ``dropout``: false runs the body
    in eval mode while it learns (no dropout masks: a deterministic forward); ``batch_size``:
    pairs (cosine) or half the examples (supcon) per step and rank, default train.batch_size;
    ``schedule`` / ``warmup``: the stage's own LR schedule (default optim.schedule / optim.warmup,
    which the end-to-end epochs keep); ``sampling``: how the cosine loss draws its pairs
    (make_pairs)."""
    rank, world_size = world()
    labels = train.labels.tolist()
    bs = batch_size or cfg.train.batch_size
    if loss == "cosine":
        pairs = make_pairs(labels, iterations, cfg.data.seed, sampling)
        order = epoch_order(len(pairs), cfg.train.seed + cfg.data.seed, 0, rank, world_size)
        batches = [order[i:i + bs] for i in range(0, len(order), bs)]
    else:  # every rank takes its share of each global batch
        batches = [b[rank::world_size] for b in
                   supcon_batches(labels, iterations, bs * world_size, cfg.data.seed)]
    stage_cfg = cfg.replace({"optim.lr": lr, "train.grad_accum": 1,
                             "optim.name": "adamw" if cfg.optim.name == "gd" else cfg.optim.name,
                             "optim.schedule": schedule or cfg.optim.schedule,
                             "optim.warmup": cfg.optim.warmup if warmup is None else warmup})
    batcher = Batcher(cfg, built, device)
    losses: list[float] = []
    with swapped_head(built, nn.Identity()), frozen_token_table(built, freeze_embeddings):
        pair_model = PairModel(built.module, temperature)
        engine = create_engine(stage_cfg, pair_model, device, total_steps=len(batches))
        engine.train(True)
        if not dropout:
            pair_model.body.eval()  # gradients flow as before; only dropout is off
        for step, batch in enumerate(batches):
            batch_loss = (partial(pair_batch_loss, engine.forward, batcher, train, pairs, batch,
                                  device) if loss == "cosine" else
                          partial(supcon_batch_loss, engine.forward, batcher, train, batch,
                                  device))
            value, _ = train_step(engine, batch_loss, seed=step_seed(cfg.train.seed, step, rank),
                                  where=f"in the contrastive stage, step {step}",
                                  lr=lr, lr_field="model.strategy_params.contrastive.lr")
            losses.append(value)
        engine.train(False)
        def embed(split: Split) -> torch.Tensor:  # through the engine: ZeRO-3 shards the body
            return embed_split(lambda **x: engine.forward(**{"a_" + k: v for k, v in x.items()}),
                               batcher, split, cfg.train.eval_batch_size)
        feats, extra = embed(train), (embed(also) if also is not None else None)
    built.module.train(True)
    return losses, feats, extra


def pair_batch_loss(forward: Callable[..., torch.Tensor], batcher: Batcher, split: Split,
                    pairs: list[tuple[int, int, float]], batch: list[int],
                    device: torch.device) -> torch.Tensor:
    """The pair loss (a PairModel's forward, or an engine's around it) on pairs ``batch``.

    Each text of the batch is encoded once, however many of its pairs it is in: with 16
    examples, a batch of 8 pairs names about 10 distinct texts, not 16."""
    a, b = [pairs[k][0] for k in batch], [pairs[k][1] for k in batch]
    texts = sorted(set(a) | set(b))
    where = {i: p for p, i in enumerate(texts)}
    return forward(target=torch.tensor([pairs[k][2] for k in batch], device=device),
                   left=torch.tensor([where[i] for i in a], device=device),
                   right=torch.tensor([where[i] for i in b], device=device),
                   **batch_inputs(batcher, split, texts, "a_"))


def supcon_batch_loss(forward: Callable[..., torch.Tensor], batcher: Batcher, split: Split,
                      batch: list[int], device: torch.device) -> torch.Tensor:
    """The supervised contrastive loss on the examples ``batch``."""
    return forward(labels=split.labels[batch].to(device),
                   **batch_inputs(batcher, split, batch, "a_"))


def templated(train: Split, copies: int, template: str) -> Split:
    """``train`` and, per class, ``copies`` examples of its name in ``template`` (SetFit's
    label templates): texts that say what the class is, for the pair stage to pull towards."""
    names = class_names(train)
    texts = [template.format(n) for n in names.inputs for _ in range(copies)]
    labels = names.labels.repeat_interleave(copies)
    return Split(list(train.inputs) + texts, torch.cat([train.labels, labels]),
                 classes=train.classes)


@register_strategy("contrastive", ranges={"iterations": (1, 1000), "lr": (0.0, 1.0),
                                          "temperature": (1e-3, 10.0),
                                          "batch_size": (1, 4096), "warmup": (0.0, 1.0),
                                          "templates": (0, 64)},
                   reusable=True, probe=True)
def contrastive(cfg: RunConfig, built: BuiltModel, train: Split, device: torch.device, *,
                iterations: int = 5, lr: float = 2e-5, loss: ContrastiveLoss = "cosine",
                temperature: float = 0.05, label_names: LabelNames = "none",
                freeze_embeddings: bool = False, dropout: bool = True,
                batch_size: int | None = None, schedule: Schedule | None = None,
                warmup: float | None = None, sampling: PairSampling = "anchored",
                templates: int = 0, template: str = "This sentence is {}.") -> None:
    """SetFit-style: contrastive stage on the body, then the probe head on the new embeddings.

    ``iterations``: pair rounds, each pairs every example with one same-class and one
    other-class example; ``lr``: learning rate of the pair stage on the body; ``loss``:
    ``cosine`` (SetFit's pair loss) or ``supcon`` (in-batch supervised contrastive, the same
    compute); ``temperature``: supcon's softmax temperature; ``label_names``: ``prior`` or
    ``anchors``, how the class names (embedded by the trained body) help the probe;
    ``freeze_embeddings`` / ``dropout`` / ``batch_size``: see contrastive_stage (each cuts the
    stage's time: the first two a step's, a larger batch the steps, as few texts repeat);
    ``schedule`` / ``warmup``: the stage's LR schedule (SetFit's: linear, 0.1); ``sampling``:
    ``anchored`` or ``unique`` pairs (make_pairs); ``templates``: copies per class of its name
    in ``template`` that join the pair stage's examples (SetFit's label templates; the probe
    still fits the labelled examples alone)."""
    staged = templated(train, templates, template) if templates else train
    _, feats, names = contrastive_stage(
        cfg, built, staged, device, iterations=iterations, lr=lr, loss=loss,
        temperature=temperature, also=class_names(train) if label_names != "none" else None,
        freeze_embeddings=freeze_embeddings, dropout=dropout, batch_size=batch_size,
        schedule=schedule, warmup=warmup, sampling=sampling)
    probe_head(cfg, built, train, device, feats=feats[:len(train)], names=names,
               label_names=label_names)


def pair_loss(cfg: RunConfig, built: BuiltModel, train: Split, device: torch.device,
              iterations: int = 1) -> float:
    """Mean pair loss of the current body on freshly drawn pairs (to check the stage helps)."""
    batcher = Batcher(cfg, built, device)
    pairs = make_pairs(train.labels.tolist(), iterations, cfg.data.seed + 1)
    built.module.to(device).eval()
    total = 0.0
    with torch.no_grad(), swapped_head(built, nn.Identity()):
        model = PairModel(built.module)
        for start in range(0, len(pairs), 64):
            chunk = list(range(start, min(start + 64, len(pairs))))
            total += float(pair_batch_loss(model, batcher, train, pairs, chunk, device)) * len(chunk)
    built.module.train(True)
    return total / max(1, len(pairs))



# --------------------------------------------------------------------------------------------
# Prototypical networks (Snell et al. 2017)


def class_prototypes(emb: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The mean embedding of each class, [num_classes, D]."""
    sums = torch.zeros(num_classes, emb.shape[1], dtype=emb.dtype, device=emb.device)
    sums.index_add_(0, labels.to(emb.device), emb)
    counts = torch.bincount(labels.to(emb.device), minlength=num_classes).clamp_min(1)
    return sums / counts.unsqueeze(1).to(emb.dtype)


def prototype_logits(query: torch.Tensor, prototypes: torch.Tensor, metric: str,
                     scale: float) -> torch.Tensor:
    """Negative squared Euclidean distance, or scaled cosine similarity, to each prototype."""
    if metric == "cosine":
        return scale * F.normalize(query, dim=-1) @ F.normalize(prototypes, dim=-1).T
    return -torch.cdist(query.float(), prototypes.float()).pow(2)


class EpisodeHead(nn.Module):
    """Stands in for the head during an episode: the queries' logits against the prototypes
    of the episode's own support (layout of trainers.episodes: support first, class-major)."""

    def __init__(self, ways: int, shots: int, metric: str, scale: float):
        super().__init__()
        self.ways, self.shots, self.metric, self.scale = ways, shots, metric, scale

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        n = self.ways * self.shots
        protos = emb[:n].reshape(self.ways, self.shots, -1).mean(1)
        return prototype_logits(emb[n:], protos, self.metric, self.scale)


@torch.no_grad()
def set_prototype_head(head: nn.Linear, prototypes: torch.Tensor, metric: str,
                       scale: float) -> None:
    """Make the linear head a nearest-prototype classifier.

    Euclidean: -|x - c|^2 = 2 c.x - |c|^2 - |x|^2, and the last term is the same for every
    class, so W = 2c, b = -|c|^2 gives exactly the prototype logits' softmax. Cosine: W = s c/|c|
    gives the same ranking of classes for every x (|x| only rescales the row).
    """
    if metric == "cosine":
        set_head(head, scale * F.normalize(prototypes, dim=-1), torch.zeros(len(prototypes)))
    else:
        set_head(head, 2 * prototypes, -(prototypes * prototypes).sum(1))


class ProtoNet(Strategy):
    """Nearest-prototype classification, trained on episodes or fine-tuned from prototypes.

    The head always starts as the nearest-prototype classifier of the training split. With
    ``episodes`` > 0 each epoch is that many ``ways``-way ``shots``-shot episodes with
    ``queries`` queries per class (the pretraining stage): the head is frozen, the backbone
    learns from the prototype loss, and before every evaluation the head is rebuilt from the
    prototypes of the whole training split. With ``episodes=0`` the run is few-shot: epochs=0
    classifies by the support set's prototypes; epochs > 0 fine-tunes the backbone and the
    prototype-initialised head on the (augmented) support set with cross entropy.
    """

    def __init__(self, metric: str = "euclidean", scale: float = 10.0, ways: int = 20,
                 shots: int = 1, queries: int = 5, episodes: int = 0):
        super().__init__()
        if metric not in ("euclidean", "cosine"):
            raise ValueError(f"metric={metric!r}: allowed euclidean, cosine")
        if min(ways, shots, queries) < 1 or ways < 2 or episodes < 0:
            raise ValueError(f"need ways >= 2, shots >= 1, queries >= 1, episodes >= 0 (got "
                             f"ways={ways}, shots={shots}, queries={queries}, "
                             f"episodes={episodes})")
        from trainers.episodes import EpisodeShape

        self.metric, self.scale, self.episodes = metric, float(scale), episodes
        self.shape = EpisodeShape(ways, shots, queries)

    def setup(self, built: BuiltModel) -> None:
        if self.episodes:  # the head learns nothing from episodes: DDP must not wait for it
            head_module(built).requires_grad_(False)

    def prepare(self, cfg: RunConfig, built: BuiltModel, train: Split,
                device: torch.device) -> None:
        if not self.episodes:  # episodic runs rebuild the head before each evaluation anyway
            set_prototypes(cfg, built, train, device, self.metric, self.scale)

    def micro_batches_per_epoch(self, n: int, micro_bs: int, world_size: int) -> int | None:
        return -(-self.episodes // world_size) if self.episodes else None

    def batches(self, cfg: RunConfig, train: Split, epoch: int, rank: int, world_size: int,
                ) -> list[tuple[list[int], torch.Tensor | None]] | None:
        if not self.episodes:
            return None
        from trainers.episodes import EpisodeSampler, epoch_episodes

        if cfg.augment.mixup_alpha or cfg.augment.cutmix_alpha:
            raise ConfigError("model.strategy=protonet: episodes cannot be mixed (set "
                              "augment.mixup_alpha=0 and augment.cutmix_alpha=0)")
        sampler = EpisodeSampler(train.labels.tolist(), self.shape, cfg.train.seed + cfg.data.seed)
        targets = self.shape.query_targets()
        return [(idx, targets) for idx in epoch_episodes(sampler, epoch, self.episodes, rank,
                                                          world_size)]

    @contextmanager
    def training(self, built: BuiltModel) -> Iterator[None]:
        if not self.episodes:
            yield
            return
        head = EpisodeHead(self.shape.ways, self.shape.shots, self.metric, self.scale)
        with swapped_head(built, head):
            yield

    def before_evaluation(self, cfg: RunConfig, built: BuiltModel, train: Split,
                          device: torch.device) -> None:
        if self.episodes:  # the frozen head is stale: rebuild it from the new embeddings
            set_prototypes(cfg, built, train, device, self.metric, self.scale)


def set_prototypes(cfg: RunConfig, built: BuiltModel, train: Split, device: torch.device,
                   metric: str, scale: float) -> None:
    """The head becomes the nearest-prototype classifier of ``train`` (its class means)."""
    head = head_module(built)
    built.module.to(device)
    feats = head_inputs(built, Batcher(cfg, built, device), train, cfg.train.eval_batch_size)
    set_prototype_head(head, class_prototypes(feats, train.labels, head.out_features), metric,
                       scale)


register_strategy("protonet")(ProtoNet)
