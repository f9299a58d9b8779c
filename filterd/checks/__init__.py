"""Checks: small functions that read a MessageView and return named symbols.

Each module registers its functions with `filterd.pipeline.check`; rules/ binds them by name
with arguments ([check.NAME] tables) and scores their symbols ([scores]).
"""
