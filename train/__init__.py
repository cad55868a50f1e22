"""Command-line entry points (`python -m train.NAME`).

Each command's `main()` calls `deebert_jax.setup_process` first (malloc kept, the fused threefry
lowering, orbax's noise dropped); importing this package changes nothing.
"""
