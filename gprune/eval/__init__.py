"""Multiple-choice evaluation: lm-eval task generation from local files and running."""
