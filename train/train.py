"""Two-stage DeeBERT training.

    python -m train.train --config configs/tiny.py
    python -m train.train --config configs/glue_minilm.py --config.task=SST-2 --config.workdir=workdirs/sst2

Started again on the same workdir it resumes from the latest checkpoint.
"""

import logging
import sys

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)", lock_config=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO
    from deebert_jax import training

    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config configs/tiny.py")
    try:
        result = training.train(cfg)
    except training.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for stage, record in result["eval"].items():
        final = record["final"]
        print(f"stage {stage}: dev {record['metric']} of the final ramp = {final[record['metric']]:.4f} "
              f"({record['num_examples']} examples)")
        for ramp in record.get("ramps", []):
            print(f"  ramp {ramp['layer']}: {record['metric']} = {ramp[record['metric']]:.4f}")
    print(f"model: {result['model']}")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
