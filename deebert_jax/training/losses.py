"""The two stages' losses over ramp logits.

Stage 1: the mean cross-entropy of ramp L. Stage 2 trains off-ramps 1..L-1 with an `OffRampLoss`:
- "labels" (DeeBERT): the sum over off-ramps of their mean cross-entropies with the labels;
- "distill": each off-ramp also learns ramp L's soft predictions at a temperature T (FastBERT's
  self-distillation; BERxiT trains exits the same way): per off-ramp
  (1 - w) * CE(labels) + w * T^2 * KL(softmax(z_L / T) || softmax(z_i / T)), summed over off-ramps.
  The calibration guarantee bounds an off-ramp's *disagreement with ramp L*, so this trains for it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from deebert_jax.core.errors import InputError

OFFRAMP_LOSSES = ("labels", "distill")


@dataclasses.dataclass(frozen=True)
class OffRampLoss:
    """Stage 2's loss; hashable, so it can key a compiled step. `temperature` and `weight` are
    read by "distill" only (weight 0: the labels loss; weight 1: distillation alone)."""

    kind: str = "labels"
    temperature: float = 2.0
    weight: float = 0.5

    def __post_init__(self):
        if self.kind not in OFFRAMP_LOSSES:
            raise InputError(f"off-ramp loss {self.kind!r}: expected one of {', '.join(OFFRAMP_LOSSES)}")
        if not (self.temperature > 0 and self.temperature < float("inf")):
            raise InputError(f"distillation temperature {self.temperature!r}: expected a number > 0")
        if not 0 <= self.weight <= 1:
            raise InputError(f"distillation weight {self.weight!r}: expected a number in [0, 1]")

    @property
    def needs_final_ramp(self) -> bool:
        """Whether the step must compute ramp L's logits (the teacher) in stage 2."""
        return self.kind == "distill"

    def describe(self) -> str:
        """What a run spec and a report record: "labels" or "distill(T=2,w=0.5)"."""
        return self.kind if self.kind == "labels" else f"distill(T={self.temperature:g},w={self.weight:g})"


LABELS = OffRampLoss()


def stage_loss(ramp_logits: jax.Array, labels: jax.Array, stage: int) -> tuple[jax.Array, dict]:
    """ramp_logits [L, B, K], labels [B] -> (loss, metrics).

    Stage 1: mean cross-entropy of ramp L. Stage 2: sum over ramps 1..L-1 of their mean cross-entropies.
    """
    if stage == 2:
        return off_ramp_loss(ramp_logits[:-1], labels)
    ce = optax.softmax_cross_entropy_with_integer_labels(ramp_logits, labels[None, :]).mean(axis=1)  # [L]
    return _with_accuracy(ce[-1], ramp_logits[-1], labels)


def off_ramp_loss(off_ramp_logits: jax.Array, labels: jax.Array, final_logits: jax.Array | None = None,
                  loss: OffRampLoss = LABELS) -> tuple[jax.Array, dict]:
    """Stage 2's loss: off-ramp logits [L-1, B, K], labels [B], ramp L's logits [B, K] (the
    teacher, needed by "distill"; no gradient flows into it) -> (loss, metrics)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(off_ramp_logits, labels[None, :]).mean(axis=1)  # [L-1]
    if loss.kind == "labels":
        return _with_accuracy(ce.sum(), off_ramp_logits, labels)
    if final_logits is None:
        raise InputError("the distillation loss needs ramp L's logits")
    kl = distillation_kl(off_ramp_logits, final_logits, loss.temperature)                          # [L-1]
    total = ((1.0 - loss.weight) * ce + loss.weight * loss.temperature ** 2 * kl).sum()
    value, metrics = _with_accuracy(total, off_ramp_logits, labels)
    agree = jnp.argmax(off_ramp_logits, -1) == jnp.argmax(final_logits, -1)[None]
    return value, {**metrics, "agreement": agree.mean()}


def distillation_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """[R, B, K] students, [B, K] teacher -> [R]: mean over B of KL(softmax(t/T) || softmax(s/T)),
    in float32, the teacher under stop_gradient."""
    teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
    log_p = jax.nn.log_softmax(teacher, axis=-1)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return (jnp.exp(log_p)[None] * (log_p[None] - log_q)).sum(-1).mean(-1)


def _with_accuracy(loss: jax.Array, logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
    accuracy = (jnp.argmax(logits, axis=-1) == labels).mean()
    return loss, {"loss": loss, "accuracy": accuracy}
