"""The product's commands: convert, train, evaluate, calibrate, predict, serve.

Each module's `main(argv)` parses its flags, calls `setup_process` and then the library, and
raises a project error for `cli.run` to print as one line; `entry(argv=None)` is that, as the
console scripts (`deebert-NAME`) and `python -m train.NAME` in a checkout run it. Importing a
command module loads nothing heavy (JAX comes after `setup_process`).
"""
