"""Eager PyTorch DeeBERT: `transformers`' BERT layers plus highway heads.

The reference for parity tests and the latency benchmark. Module names mirror the original
DeeBERT state-dict keys (`bert.encoder.highway.{i}.*`), so a DeeBERT-format checkpoint loads with
`load_state_dict(strict=True)` and nothing of ours (no converter) sits between file and model.
A `config.json` with `model_type: roberta` gives DeeRoBERTa, as the Hugging Face research project
builds it: the same model under `roberta.*` with `transformers`' `RobertaEmbeddings`.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn
from transformers import BertConfig, RobertaConfig
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer, BertPooler
from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

from deebert_jax.weights.torch_files import CheckpointError, find_weights_file, read_state_dict


class Highway(nn.Module):
    """The original `BertHighway`: pooler -> dropout -> classifier."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.pooler = BertPooler(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden):
        return self.classifier(self.dropout(self.pooler(hidden)))


class _Encoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])
        self.highway = nn.ModuleList([Highway(config) for _ in range(config.num_hidden_layers)])


class _Bert(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        # RoBERTa's embeddings differ only in their position ids (from pad_token_id + 1).
        roberta = getattr(config, "model_type", "bert") == "roberta"
        self.embeddings = (RobertaEmbeddings if roberta else BertEmbeddings)(config)
        self.encoder = _Encoder(config)
        self.pooler = BertPooler(config)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [...] softmax entropy in nats, from log-softmax (no overflow)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class TorchDeeBert(nn.Module):
    """`bert.{embeddings,encoder.layer,encoder.highway,pooler}` + `classifier`, as in DeeBERT
    (`roberta.*` for a `RobertaConfig`: DeeRoBERTa)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        # The attribute name is the state-dict prefix: `bert` or `roberta`.
        self.base_model_prefix = "roberta" if getattr(config, "model_type", "bert") == "roberta" else "bert"
        setattr(self, self.base_model_prefix, _Bert(config))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    @property
    def backbone(self) -> nn.Module:
        """Embeddings, encoder (layers and highways) and pooler: `self.bert` or `self.roberta`."""
        return getattr(self, self.base_model_prefix)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, attn_implementation: str = "sdpa") -> "TorchDeeBert":
        """Loads a DeeBERT- or DeeRoBERTa-format directory (`config.json` + weights) strictly, in eval mode."""
        directory = os.fspath(directory)
        path = os.path.join(directory, "config.json")
        if not os.path.isfile(path):
            raise CheckpointError(f"{directory}: no config.json in this directory")
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        config = (RobertaConfig if raw.get("model_type") == "roberta" else BertConfig)(**raw)
        config._attn_implementation = attn_implementation
        model = cls(config)
        state = {k: torch.from_numpy(v) for k, v in read_state_dict(find_weights_file(directory)).items()
                 if not k.endswith(("position_ids", "embeddings.token_type_ids"))}
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Buffers that transformers recreates itself are the only keys allowed to be absent.
        missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
        if missing or unexpected:
            raise CheckpointError(f"{directory}: not a {'DeeRoBERTa' if model.base_model_prefix == 'roberta' else 'DeeBERT'} "
                                  f"checkpoint (missing {missing[:3]}, unexpected "
                                  f"{unexpected[:3]}); convert it with `python -m train.convert` first")
        return model.eval()

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def _mask_bias(self, attention_mask: torch.Tensor, dtype) -> torch.Tensor:
        return ((1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min)

    def ramp(self, i: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Ramp i (0-based): highway i for i < L-1, the final pooler + classifier for i = L-1.

        Highways read the first token, or with `ramp_pooling: "mean"` in config.json (a
        deebert-jax extension) the mean of the real tokens.
        """
        if i == self.num_layers - 1:
            return self.classifier(self.dropout(self.backbone.pooler(hidden)))
        if getattr(self.config, "ramp_pooling", "first") == "mean":
            real = attention_mask[:, :, None].to(torch.float32)
            mean = (hidden.float() * real).sum(1) / real.sum(1).clamp(min=1.0)
            hidden = mean.to(hidden.dtype)[:, None]  # the pooler reads position 0
        return self.backbone.encoder.highway[i](hidden)

    def layer(self, i: int, hidden: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        out = self.backbone.encoder.layer[i](hidden, mask_bias)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_hidden_states=False):
        """All ramps' logits [L, B, K] (and every layer's output [L, B, S, H])."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        bias = self._mask_bias(attention_mask, hidden.dtype)
        logits, states = [], []
        for i in range(self.num_layers):
            hidden = self.layer(i, hidden, bias)
            states.append(hidden)
            logits.append(self.ramp(i, hidden, attention_mask))
        logits = torch.stack(logits)
        return (logits, torch.stack(states)) if output_hidden_states else logits

    def full_forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """The plain classifier: L layers, then the final head only. [B, K]."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        bias = self._mask_bias(attention_mask, hidden.dtype)
        for i in range(self.num_layers):
            hidden = self.layer(i, hidden, bias)
        return self.ramp(self.num_layers - 1, hidden, attention_mask)

    def early_exit(self, input_ids, attention_mask=None, token_type_ids=None, threshold: float = 0.0):
        """DeeBERT inference -> (logits [B, K], exit_layer [B], 1-based).

        At batch size 1 this is the original: the first off-ramp whose entropy is under the
        threshold answers, else the final classifier. A larger batch runs until every example
        has exited, each keeping its own first exit (the loop a PyTorch user would write).
        Written out here rather than shared with the JAX loops' `record_exits`: this is the
        independent reference those loops are checked against.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        bias = self._mask_bias(attention_mask, hidden.dtype)
        B, L = input_ids.shape[0], self.num_layers
        out = torch.zeros(B, self.config.num_labels, dtype=torch.float32, device=hidden.device)
        exit_layer = torch.zeros(B, dtype=torch.long, device=hidden.device)
        done = torch.zeros(B, dtype=torch.bool, device=hidden.device)
        for i in range(L):
            hidden = self.layer(i, hidden, bias)
            logits = self.ramp(i, hidden, attention_mask).float()
            exits = ~done & ((entropy(logits) < threshold) | (i == L - 1))
            out[exits] = logits[exits]
            exit_layer[exits] = i + 1
            done |= exits
            if bool(done.all()):
                break
        return out, exit_layer
