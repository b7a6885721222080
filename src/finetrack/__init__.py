"""finetrack: fine-tune causal LMs and study the trajectory of a run."""

__version__ = "0.1.0"
