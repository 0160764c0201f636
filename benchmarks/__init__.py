"""Benchmarks that print tables side by side with the peers (transformers, PEFT) in one run.

Not part of the server package: they need ``peft`` and build their own models. Run ``make bench``
or ``python -m benchmarks --help``.
"""
