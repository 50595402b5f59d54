"""Benchmark inputs: ShareGPT prompts and synthetic random-token prompts."""

from zycompile.data.sharegpt import SampledRequest, load_conversations, sample_random, sample_sharegpt

__all__ = ["SampledRequest", "load_conversations", "sample_random", "sample_sharegpt"]
