"""The generator service: decoding from a KV handle, streamed; follow-up turns from the cache."""
