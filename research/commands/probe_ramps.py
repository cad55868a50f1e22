"""Can an off-ramp read the class from layer l? First token against the mean of the tokens.

    python -m train.probe_ramps --checkpoint workdirs/demo/train/stage1 --task sst2 --limit 4000 \
        --max-seq-length 64 --out research/results/probe_sst2.md

Caches every layer's first-token and mean-of-tokens vectors of a (stage-1) model on `--limit`
training and all dev examples, then trains one ramp (dense + tanh, classifier; AdamW, linear
decay) per layer and feature on the cached vectors and reports its dev accuracy, with the spread of
the vectors (mean distance to their mean over the mean's norm: near 0, every input looks alike).
Quicker than stage 2 because the encoder runs once; for choosing `model.ramp_pooling`.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from deebert_jax.data import batching
from deebert_jax.data import glue as data_lib
from deebert_jax.weights.checkpoint import load_checkpoint
from deebert_jax.model.modeling import DeeBert, attention_bias, mean_of_real_tokens
from deebert_jax.commands import cli


def layer_features(config, params, arrays, batch_size=128):
    """-> (first token [L, N, H], mean of real tokens [L, N, H]) as numpy."""
    model = DeeBert(config)

    @jax.jit
    def run(ids, mask, types):
        _, hidden = model.apply({"params": params}, ids, mask, types, output_hidden_states=True)  # [L, B, S, H]
        return hidden[:, :, 0], mean_of_real_tokens(hidden, attention_bias(mask)[None])

    first, mean = [], []
    n = data_lib.num_examples(arrays)
    for batch in tqdm(batching.eval_batches(arrays, batch_size), total=-(-n // batch_size), desc="features"):
        f, m = run(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        keep = np.asarray(batch["valid"], bool)
        first.append(np.asarray(f)[:, keep])
        mean.append(np.asarray(m)[:, keep])
    return np.concatenate(first, 1), np.concatenate(mean, 1)


def spread(x: np.ndarray) -> float:
    """[N, H] -> mean distance to the mean, over the mean's norm."""
    centre = x.mean(0)
    return float(np.linalg.norm(x - centre, axis=-1).mean() / max(np.linalg.norm(centre), 1e-12))


def train_ramp(x_train, y_train, x_dev, y_dev, labels, lr, epochs, batch, seed) -> float:
    """A DeeBERT ramp on fixed features -> dev accuracy."""
    h = x_train.shape[-1]
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = {"pooler": {"kernel": 0.02 * jax.random.normal(k1, (h, h)), "bias": jnp.zeros(h)},
              "classifier": {"kernel": 0.02 * jax.random.normal(k2, (h, labels)), "bias": jnp.zeros(labels)}}
    steps = epochs * max(1, len(y_train) // batch)
    tx = optax.adamw(optax.linear_schedule(lr, 0.0, steps), weight_decay=0.01)
    state = tx.init(params)

    def logits(p, x):
        return jnp.tanh(x @ p["pooler"]["kernel"] + p["pooler"]["bias"]) @ p["classifier"]["kernel"] \
            + p["classifier"]["bias"]

    @jax.jit
    def step(p, s, x, y):
        grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(logits(p, x), y).mean())(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(y_train))
        for i in range(0, len(order) - batch + 1, batch):
            rows = order[i:i + batch]
            params, state = step(params, state, x_train[rows], y_train[rows])
    return float((np.asarray(logits(params, x_dev)).argmax(-1) == y_dev).mean())


def main(argv=None) -> int:
    """-> exit status: 0, 1 on a project error (one line on stderr), 2 on bad flags."""
    return cli.run(_main, argv)


def _main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m train.probe_ramps", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a deebert-jax model directory (e.g. WORKDIR/stage1)")
    p.add_argument("--task", default="sst2")
    p.add_argument("--glue-dir", default=None, help="default: $GLUE_DIR")
    p.add_argument("--limit", type=int, default=4000, help="training examples to cache (0: all)")
    p.add_argument("--max-seq-length", type=cli.positive_int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=cli.positive_int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the table as Markdown here")
    args = p.parse_args(argv)
    from deebert_jax.cpu.process import setup_process
    setup_process()   # process-wide settings, before JAX runs anything

    from deebert_jax.core.fileutil import atomic_write_text, check_outputs
    from deebert_jax.weights.checkpoint import MODEL_DIR_FILES

    task = data_lib.canonical_task(args.task)
    glue_dir = args.glue_dir or os.environ.get("GLUE_DIR")
    if args.out:   # before the work: neither a directory nor a file this command reads
        read = {f"--glue-dir ({split})": data_lib.glue_file(task, split, glue_dir)
                for split in ("train", "dev") if glue_dir and data_lib.TASKS[task] is not None}
        check_outputs({"--out": args.out}, {"--checkpoint": args.checkpoint, **read},
                            reads={"--checkpoint": MODEL_DIR_FILES})
    config, params = load_checkpoint(args.checkpoint)
    tokenizer = None if task == "synthetic" else data_lib.load_tokenizer(os.path.join(args.checkpoint, "tokenizer"),
                                                                          config)
    common = dict(glue_dir=glue_dir, tokenizer=tokenizer,
                  max_seq_length=args.max_seq_length, vocab_size=config.vocab_size, seed=args.seed)
    train = data_lib.load_split(task, "train", limit=args.limit or None, **common)
    dev = data_lib.load_split(task, "dev", **common)
    train_first, train_mean = layer_features(config, params, train)
    dev_first, dev_mean = layer_features(config, params, dev)
    y_train, y_dev = np.asarray(train["labels"]), np.asarray(dev["labels"])
    labels = data_lib.num_labels(task)

    header = ["layer", "first-token spread", "first-token ramp accuracy", "mean spread", "mean ramp accuracy"]
    rows = []
    for layer in tqdm(range(config.num_hidden_layers), desc="ramps"):
        fit = lambda xt, xd: train_ramp(xt[layer], y_train, xd[layer], y_dev, labels, args.lr, args.epochs,
                                        args.batch_size, args.seed)
        rows.append([str(layer + 1), f"{spread(train_first[layer]):.4f}", f"{100 * fit(train_first, dev_first):.2f}",
                     f"{spread(train_mean[layer]):.4f}", f"{100 * fit(train_mean, dev_mean):.2f}"])
    command = "python -m train.probe_ramps " + " ".join(argv)
    lines = [f"`{command}`", "",
             f"{task}: {len(y_train)} training / {len(y_dev)} dev examples, length {args.max_seq_length}; "
             f"one ramp per layer and feature, AdamW lr {args.lr:g}, {args.epochs} epochs, batch {args.batch_size}; "
             f"dev accuracy in %.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")
        print(f"wrote {args.out}")
    return 0


entry = main   # the console script and `python -m`: `main` prints its own errors


if __name__ == "__main__":
    sys.exit(entry())
