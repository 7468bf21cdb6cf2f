"""maskkv: mask-query KV-cache eviction for long-prompt diffusion LLMs (LLaDA, Dream)."""

__version__ = "0.1.0"
