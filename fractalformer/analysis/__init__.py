"""Looking at runs: plots of their metrics."""
