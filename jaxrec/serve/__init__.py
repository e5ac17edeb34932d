"""Serving: checkpoints -> recommendations (batch, incremental with a KV cache, HTTP)."""
