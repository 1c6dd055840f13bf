"""The OpenAI-compatible server: HTTP app (rank 0), scheduler, batched decoding on every rank, wire format."""
