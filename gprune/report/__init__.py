"""The report: one results table across runs, Markdown, PNG plots, Prefect artifacts."""
