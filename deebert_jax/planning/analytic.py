"""Matmul FLOPs of DeeBERT's programs counted by hand from the model's shape: the check on what
`costs` reads off the traced programs. 2 FLOPs per multiply-add; per example."""

from __future__ import annotations

from deebert_jax.core.config import DeeBertConfig


def layer_flops(config: DeeBertConfig, seq_len: int, first_token_only: bool = False) -> float:
    """One encoder layer, forward, for one example of `seq_len` tokens.

    A first-token-only layer (the last one any ramp reads) folds the key and value projections
    into its one query (`attention.first_query_attention`): its attention reads the layer's input
    once per head instead of projecting every token.
    """
    H, I, S, heads = config.hidden_size, config.intermediate_size, seq_len, config.num_attention_heads
    if first_token_only:
        return (4 * 2 * H * H            # query, key fold, value fold, attention output
                + 2 * H                  # the key bias folded into the query
                + 2 * 2 * heads * S * H  # scores and context over the layer's input
                + 2 * 2 * H * I)         # feed-forward in and out
    return 4 * 2 * S * H * H + 2 * 2 * S * S * H + 2 * 2 * S * H * I


def ramp_flops(config: DeeBertConfig, seq_len: int, pooled_mean: bool) -> float:
    """One ramp (pooler and classifier) on one example; "mean" pooling adds its weighted sum."""
    H, K = config.hidden_size, config.num_labels
    return 2 * (H * H + H * K) + (2 * seq_len * H if pooled_mean else 0)


def forward_flops(config: DeeBertConfig, seq_len: int) -> float:
    """Every ramp at full depth, eval mode (layer L for the first token only), one example."""
    L, mean = config.num_hidden_layers, config.ramp_pooling == "mean"
    return ((L - 1) * layer_flops(config, seq_len) + layer_flops(config, seq_len, first_token_only=True)
            + (L - 1) * ramp_flops(config, seq_len, mean) + ramp_flops(config, seq_len, False))


def train_step_flops(config: DeeBertConfig, stage: int, seq_len: int, teacher: bool = False) -> float:
    """One training step, one example: the forward and, for what the stage trains, the backward
    (twice the forward's matmuls: the input's gradient and the weights').

    The L ramps run stacked (one vmapped ramp over all of them), forward and backward, whichever
    of them the stage trains. Stage 1 trains the encoder and ramp L: layers 1..L-1 and layer L
    for the first token, three times. Stage 2 trains the off-ramps on a frozen encoder, run
    forward once up to layer L-1 (for the first token at L-1 unless the off-ramps read the mean;
    with a distillation `teacher`, on to layer L for the first token); the ramps' backward then
    needs no gradient for the pooler's input: the pooler's weights, the classifier's weights and input.
    """
    L, H, K, mean = config.num_hidden_layers, config.hidden_size, config.num_labels, config.ramp_pooling == "mean"
    full = lambda n: n * layer_flops(config, seq_len)
    first = layer_flops(config, seq_len, first_token_only=True)
    ramps = (L - 1) * ramp_flops(config, seq_len, mean) + ramp_flops(config, seq_len, False)
    if stage == 1:
        return 3 * (full(L - 1) + first + ramps)
    encoder = full(L - 1) + first if teacher else (full(L - 1) if mean else full(L - 2) + first)
    return encoder + ramps + L * (2 * H * H + 2 * 2 * H * K)
