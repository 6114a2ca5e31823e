"""Shared code of the dylen-jobs functions, in three layers that import one way:
platform <- jobs <- lessons (and the functions and the CLI on top)."""
