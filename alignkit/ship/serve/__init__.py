"""`alignkit serve`: an OpenAI-compatible API over the rollout engine, and the feedback store behind it."""
