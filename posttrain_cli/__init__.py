"""posttrain: LLM post-training as one recipe of ordered stages."""

__version__ = "0.1.0"
