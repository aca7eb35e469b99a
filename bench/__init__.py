"""Speed benchmarks: each script times one thing (training steps, decoding, loading,
serving, speculative decoding) and prints the figures with the machine they were measured
on. Run from the repository root as ``python -m bench.<script> --help``; they share the
timer and machine description of the top-level ``harness`` package."""
