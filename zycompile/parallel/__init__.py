"""Parallelism: process groups (distributed.py); TP/TSP plans land here too."""
