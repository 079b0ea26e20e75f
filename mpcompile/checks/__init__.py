"""Checks that stand between a rewrite and its output: the independent 2:4 checker, input
model and user-argument checks, and output validation against the dense model."""
