"""Pipeline stages: each module loads input artifacts, calls gprune.maths, writes one artifact."""
