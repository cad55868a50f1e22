"""`python -m deebert_jax.configs NAME` -> the path of the installed training config NAME, for
`deebert-train --config "$(python -m deebert_jax.configs tiny)"`; no NAME: the names."""

import sys

from deebert_jax import configs

if len(sys.argv) < 2:
    print("\n".join(configs.names()))
else:
    try:
        print(configs.path(sys.argv[1]))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
