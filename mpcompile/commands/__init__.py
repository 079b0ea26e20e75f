"""CLI subcommands: thin bodies over library code, one module per subcommand.

Each module exposes ``register(subparsers)`` which adds its parser and sets ``run`` as the
handler: ``run(args) -> int`` (the exit code). Heavy optional dependencies are imported
inside ``run`` so that a missing extra disables only the subcommand that needs it.
"""
