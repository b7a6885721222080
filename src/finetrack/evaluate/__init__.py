"""Evaluation: question sets, judges, and the suites the eval runner runs over a run's checkpoints."""
