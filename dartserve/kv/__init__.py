"""KV caches: the ragged cache a pruned prefill leaves behind (``cache``), its byte codec
(``codec``), self-describing tensor values (``blob``) and the stores (``store``). Nothing is
imported here, so that reading a store's settings does not load torch."""
