"""Teacher reasoning traces: generation (generate.py) and correctness judging (judge.py)."""
