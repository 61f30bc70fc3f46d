"""Per-sample memorization-risk signals for diffusion models.

Pure torch + numpy (plus diffusers model/scheduler classes and pydantic configs): this package
imports no prefect, lancedb, duckdb or great_expectations, so scorers can run inside any worker
and be tested on tiny models without the orchestration stack.

Modules:
    objective: the diffusion training loss with explicit, seeded (t, ε) draws per sample.
    trace: per-sample GGN / Hessian trace (layer-wise influence tracing), Hutchinson or exact.
    data_space: data-space divergence tr(∂ε_θ(x_t, t)/∂x_t) per sample.
    loss_signal: per-sample diffusion loss on the same draws (returned negated: high = risky).
"""
