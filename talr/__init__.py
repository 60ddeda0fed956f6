"""talr: domain SFT of LLMs that keeps their general capabilities (TALR and baselines)."""

__version__ = "0.1.0"
