"""Defaults the library and the servers share, importable without loading torch."""

# The pruning a request gets when it names none, from the server and from `dartserve ask`: DART
# at layer 2 keeping 64 of LLaVA-1.5's 576 vision tokens, scaled to the image's token count.
DEFAULT_PRUNING = {"method": "dart", "ratio": 64 / 576, "layer": 2}

# The engine core's scheduler: tokens one step runs at most, and requests running at once.
MAX_NUM_BATCHED_TOKENS = 2048
MAX_NUM_SEQS = 64
