"""Model access: module layout and weight orientation, hooks, loading the embedded models."""
