"""The pruner service: the prefill with pruning at layer K; the reduced KV cache goes to the store."""
