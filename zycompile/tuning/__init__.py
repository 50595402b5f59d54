"""Offline GEMM tuning: shape collection, candidates, timing, the per-device database, the tune command."""
