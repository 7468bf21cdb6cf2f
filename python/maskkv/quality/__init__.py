"""Quality suite: a tiny LLaDA trained on synthetic long-context retrieval, every method's
accuracy against its KV budget."""
