"""Benchmarks that print tables side by side with the peers (transformers, PEFT) in one run."""
