"""``zycompile bench``: the serving benchmark (TTFT, per-request and aggregate tokens/s) vs HF baselines."""
