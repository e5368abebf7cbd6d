"""llmjax: pretrain, reshape, scale and post-train small LLMs with pure JAX functions.

Importing the package does not import JAX, so entry points can set XLA flags first (see `llmjax.runtime`).
"""
