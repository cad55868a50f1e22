"""Dynamic early exit: one `lax.while_loop` iteration per layer, stopping when every row has exited.

Exit rules share one loop. A rule is `init(batch) -> state` and
`step(state, ramp_logits [B, K], threshold) -> (wants_exit [B] bool, state)`; the last ramp
always exits, whatever the rule says.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from deebert_jax.config import DeeBertConfig
from deebert_jax import modeling


class ExitResult(NamedTuple):
    logits: jax.Array       # [B, K] float32, each row's logits at its exit ramp
    exit_layer: jax.Array   # [B] int32, 1-based; 0 for rows that are all padding
    layers_run: jax.Array   # [] int32, layers the loop ran (= max exit_layer)


def entropy(logits: jax.Array) -> jax.Array:
    """[..., K] -> [...] softmax entropy in nats, from log-softmax (the exp form overflows)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


class ExitRule(NamedTuple):
    init: Callable[[int], Any]
    step: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]
    check: Callable[[float], str | None]   # an error message for a bad threshold, else None


def _entropy_step(state, logits, threshold):
    return entropy(logits) < threshold, state


def _max_prob_step(state, logits, threshold):
    return jnp.max(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=-1) > threshold, state


def _patience_init(batch):
    return jnp.full((batch,), -1, jnp.int32), jnp.zeros((batch,), jnp.int32)


def _patience_step(state, logits, threshold):
    # PABEE: count consecutive ramps that agree with the previous one; exit once the count
    # reaches the patience (the threshold).
    prev, count = state
    pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    count = jnp.where(pred == prev, count + 1, 0)
    return count >= threshold, (pred, count)


def _nonneg(x):
    return None if x >= 0 else "must be >= 0"


EXIT_RULES: dict[str, ExitRule] = {
    "entropy": ExitRule(lambda b: (), _entropy_step, _nonneg),
    "max_prob": ExitRule(lambda b: (), _max_prob_step, _nonneg),
    "patience": ExitRule(_patience_init, _patience_step,
                         lambda x: None if x >= 0 and float(x).is_integer() else "must be a whole number >= 0"),
}


def check_threshold(threshold, rule: str = "entropy") -> None:
    """Raises ValueError for an unknown rule or a NaN / out-of-range concrete threshold."""
    if rule not in EXIT_RULES:
        raise ValueError(f"unknown exit rule {rule!r}; expected one of {sorted(EXIT_RULES)}")
    if isinstance(threshold, jax.core.Tracer):
        return  # inside a caller's jit: nothing concrete to check
    value = float(threshold)
    if math.isnan(value):
        raise ValueError(f"threshold for rule {rule!r} is NaN")
    problem = EXIT_RULES[rule].check(value)
    if problem:
        raise ValueError(f"threshold={value} for rule {rule!r} {problem}")


@functools.partial(jax.jit, static_argnames=("config", "rule", "dtype"))
def _exit_loop(config: DeeBertConfig, params, input_ids, attention_mask, token_type_ids, threshold,
               rule: str = "entropy", dtype=jnp.float32) -> ExitResult:
    L, B, K = config.num_hidden_layers, input_ids.shape[0], config.num_labels
    exit_rule = EXIT_RULES[rule]
    threshold = jnp.asarray(threshold, jnp.float32)
    mask_bias = modeling.attention_bias(attention_mask, dtype)
    hidden = modeling.embed(config, params, input_ids, token_type_ids, dtype)
    padding_row = jnp.sum(attention_mask, axis=-1) == 0

    def cond(carry):
        layer, _, _, _, done, _ = carry
        return (layer < L) & ~jnp.all(done)

    def body(carry):
        layer, hidden, logits, exit_layer, done, rule_state = carry
        hidden = modeling.layer_forward(config, modeling.layer_params_at(params, layer), hidden, mask_bias, dtype)
        ramp_logits = modeling.ramp_forward(config, modeling.ramp_params_at(params, layer), hidden, dtype)
        wants_exit, rule_state = exit_rule.step(rule_state, ramp_logits, threshold)
        exits = ~done & (wants_exit | (layer == L - 1))
        logits = jnp.where(exits[:, None], ramp_logits, logits)
        exit_layer = jnp.where(exits, layer + 1, exit_layer)
        return layer + 1, hidden, logits, exit_layer, done | exits, rule_state

    carry = (jnp.int32(0), hidden, jnp.zeros((B, K), jnp.float32), jnp.zeros((B,), jnp.int32),
             padding_row, exit_rule.init(B))
    layers_run, _, logits, exit_layer, _, _ = jax.lax.while_loop(cond, body, carry)
    return ExitResult(logits, exit_layer, layers_run)


def early_exit_predict(config: DeeBertConfig, params, input_ids, attention_mask, token_type_ids, threshold,
                       rule: str = "entropy", dtype=jnp.float32) -> ExitResult:
    """Batched DeeBERT inference on one device (or a globally sharded batch under jit).

    input_ids, attention_mask, token_type_ids [B, S]; `threshold` is traced, so one compiled
    function serves every threshold. Each row exits at the first ramp whose rule fires (entropy:
    softmax entropy in nats under the threshold); ramp L always exits. Rows that are all padding
    start exited. The loop stops once every row has exited: the predicate is over the whole batch.
    """
    check_threshold(threshold, rule)
    return _exit_loop(config, params, input_ids, attention_mask, token_type_ids, threshold, rule=rule, dtype=dtype)
