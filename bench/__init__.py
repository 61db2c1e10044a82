"""GPU benchmarks (not tests): each script runs as `python -m bench.<name>` from the repository root,
writes its raw numbers under bench/results/ and ends with a short table. Results: bench/RESULTS.md."""
