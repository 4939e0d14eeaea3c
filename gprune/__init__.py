"""gprune: generalization-aware structured pruning of LLMs (GPrune-LLM, arXiv 2603.13418)."""
__version__ = "0.1.0"
