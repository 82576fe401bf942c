"""attnkern benchmark suite: `python -m benchmarks.bench --help` (see benchmarks/NOTES.md)."""
