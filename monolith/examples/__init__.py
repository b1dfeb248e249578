"""Runnable examples of monolith.core (`python -m monolith.examples.train_ctr`)."""
