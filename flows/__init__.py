"""Prefect flows: orchestration only; every stage lives in tasks/."""
