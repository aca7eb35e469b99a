"""Looking at trained runs: the ``analyze`` report (embeddings, consistency, experts, samples)."""
