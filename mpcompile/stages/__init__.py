"""The compile, as named stages over one state (see ``state.py`` and the README's pipeline table)."""
