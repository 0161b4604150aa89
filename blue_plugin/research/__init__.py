"""Research code on top of the editor's public probes: the paper's analyses and causal tracing."""
