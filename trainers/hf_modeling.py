"""A Hugging Face model class for smallshot text classifiers whose head BERT-style classes lack.

`launch.py export --format hf` copies this file into the export folder as
``modeling_smallshot.py`` when the classifier pools by the mean or L2-normalises its sentence
embedding (``*ForSequenceClassification`` only knows the first token), so

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)

gives the same logits as smallshot. It imports only torch and transformers: the folder works
without smallshot installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class SmallshotTextConfig(PretrainedConfig):
    model_type = "smallshot_text"

    def __init__(self, encoder: dict | None = None, pooling: str = "mean",
                 normalize: bool = False, **kwargs):
        self.encoder = dict(encoder or {})
        self.pooling = pooling
        self.normalize = normalize
        super().__init__(**kwargs)


class SmallshotTextForSequenceClassification(PreTrainedModel):
    """Encoder -> mean or first-token pooling -> optional L2 norm -> linear head."""

    config_class = SmallshotTextConfig
    base_model_prefix = "encoder"

    def __init__(self, config: SmallshotTextConfig):
        super().__init__(config)
        encoder_config = AutoConfig.for_model(**config.encoder)
        self.encoder = AutoModel.from_config(encoder_config, add_pooling_layer=False)
        self.head = nn.Linear(encoder_config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.config.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        else:
            pooled = hidden[:, 0]
        if self.config.normalize:
            pooled = F.normalize(pooled, dim=-1)
        logits = self.head(pooled)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
