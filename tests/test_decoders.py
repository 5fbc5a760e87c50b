"""Decoder LMs (GPT-2, Llama, Qwen2 configs) as classifiers, random init from a config folder;
gradient checkpointing and precision choices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CONFIGS
from tiny_hf import make_tiny_hf, write_text_dataset

from trainers.errors import ConfigError
from trainers.recipe import load_config


def model_cfg(folder: Path, *extra: str):
    return load_config(None, ["data.format=text", "data.root=.", f"model.name=hf:{folder}",
                              "model.pretrained=false", *extra], check_paths=False).model


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_decoder_classifier_pads_pools_the_last_real_token_and_backpropagates(
        tmp_path: Path, kind: str) -> None:
    from trainers.models import DecoderClassifier, create_model

    folder = make_tiny_hf(tmp_path / kind, kind)
    torch.manual_seed(0)
    built = create_model(model_cfg(folder), num_classes=3)
    assert isinstance(built.module, DecoderClassifier)
    tok = built.tokenizer
    assert tok.pad_token == tok.eos_token == "<eos>"  # no pad token in the vocabulary
    assert built.module.net.config.pad_token_id == tok.pad_token_id
    texts = ["good movie", "the film was very bad and not fun"]
    built.module.eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    assert (batch["input_ids"][0] == tok.pad_token_id).any()  # the short one is padded
    logits = built.module(**batch)
    assert logits.shape == (2, 3)
    # pooling takes the last non-pad token: the padded row scores as it does alone
    alone = built.module(**tok(texts[:1], return_tensors="pt"))
    assert torch.allclose(logits[0], alone[0], atol=1e-5)
    built.module.train()
    built.module(**batch).logsumexp(-1).sum().backward()
    head = built.module.get_submodule(built.head_prefixes[0].rstrip("."))
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in built.module.parameters() if p.requires_grad)


def test_pretrained_true_needs_weights_and_says_so(tmp_path: Path) -> None:
    from trainers.models import create_model

    folder = make_tiny_hf(tmp_path / "gpt2", "gpt2")
    with pytest.raises(Exception) as e:  # a config-only folder has no weights to load
        create_model(model_cfg(folder, "model.pretrained=true"), 2)
    assert "pytorch_model.bin" in str(e.value) or "safetensors" in str(e.value) or \
        "weights" in str(e.value).lower()


def test_decoder_with_lora_fits_and_grad_checkpointing_gives_the_same_run(tmp_path: Path) -> None:
    from trainers.loop import fit

    folder = make_tiny_hf(tmp_path / "llama", "llama")
    data = write_text_dataset(tmp_path / "data")

    def run(name: str, *extra: str):
        return fit(load_config(None, [
            "name=dec", "data.format=text", f"data.root={data}", "data.shots=12",
            f"model.name=hf:{folder}", "model.pretrained=false", "model.adapter=lora",
            "optim.lr=2e-2", "optim.warmup=0", "train.epochs=3", "train.batch_size=8",
            f"train.output_dir={tmp_path / name}", "train.progress=false",
            "train.num_threads=1", *extra]))

    plain = run("plain")
    ckpt = run("ckpt", "train.grad_checkpointing=true")
    losses = [r["train/loss"] for r in plain.history]
    assert losses[-1] < losses[0]
    # recomputing activations changes memory, not arithmetic: the same losses and scores
    assert [r["train/loss"] for r in ckpt.history] == pytest.approx(losses, rel=1e-5)
    assert ckpt.metrics["test/accuracy"] == plain.metrics["test/accuracy"]


def test_grad_checkpointing_on_a_model_without_it_is_refused(tmp_path: Path) -> None:
    from trainers.loop import fit

    cfg = load_config(CONFIGS / "tiny-digits.yaml", ["train.epochs=1",
                             "train.grad_checkpointing=true", f"train.output_dir={tmp_path}",
                             "train.progress=false"])
    with pytest.raises(ConfigError, match=r"train.grad_checkpointing: model.name='mlp:64' has no "
                                          r"Hugging Face module"):
        fit(cfg)


def test_fp16_on_cpu_is_refused_and_bf16_runs(tmp_path: Path) -> None:
    from trainers.loop import fit

    with pytest.raises(ConfigError, match=r"train.precision=fp16: float16 training needs CUDA"):
        load_config(None, ["data.format=digits", "model.name=mlp", "train.precision=fp16",
                           "train.device=cpu"])
    base = ["train.epochs=2", "train.device=auto", f"train.output_dir={tmp_path}",
            "train.progress=false"]
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"fp16: .* this process has none"):
            fit(load_config(CONFIGS / "tiny-digits.yaml", [*base, "train.precision=fp16"]))
    # CPU autocast in bf16
    result = fit(load_config(CONFIGS / "tiny-digits.yaml", [*base, "train.precision=bf16"]))
    assert result.metrics["test/accuracy"] > 0.3


def test_bf16_native_follows_the_hardware(monkeypatch) -> None:
    """bf16-native: bf16 autocast on CUDA and on a CPU with bf16 arithmetic, fp32 on others;
    auto stays fp32 on every CPU."""
    from trainers import engines
    from trainers.recipe import load_config

    cfg = load_config(None, ["data.format=digits", "model.name=mlp",
                             "train.precision=bf16-native"])
    auto = cfg.replace({"train.precision": "auto"})
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert isinstance(engines.native_bf16_cpu(), bool)  # this machine's answer, whatever it is
    for native in (True, False):
        monkeypatch.setattr(engines, "native_bf16_cpu", lambda native=native: native)
        assert engines.autocast_dtype(cfg, cpu) == (torch.bfloat16 if native else None)
        assert engines.autocast_dtype(cfg, cuda) == torch.bfloat16
        assert engines.autocast_dtype(auto, cpu) is None


def test_offload_options_are_checked_against_the_engine_and_stage() -> None:
    base = ["data.format=digits", "model.name=mlp"]
    with pytest.raises(ConfigError, match="train.offload: CPU offload is a DeepSpeed feature"):
        load_config(None, [*base, "train.offload=true"])
    with pytest.raises(ConfigError, match="offload_params: needs train.zero_stage=3"):
        load_config(None, [*base, "train.engine=deepspeed", "train.zero_stage=2",
                           "train.offload_params=true"])
    load_config(None, [*base, "train.engine=deepspeed", "train.zero_stage=3",
                       "train.offload=true", "train.offload_params=true"])


def test_zero_formula_reproduces_the_papers_7_5b_example() -> None:
    from trainers.memory import zero_model_state_bytes

    # ZeRO paper, figure 1: Psi = 7.5 B, N = 64, mixed-precision Adam (K = 12)
    gb = [zero_model_state_bytes(7.5e9, s, 64) / 1e9 for s in range(4)]
    assert gb == pytest.approx([120, 31.4, 16.6, 1.875], abs=0.06)
