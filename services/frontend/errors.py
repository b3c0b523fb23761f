"""What the backends raise when the model cannot be reached, in every mode."""

from __future__ import annotations

from dartserve.kv.store import StoreUnavailable


class Unavailable(Exception):
    """A stage or the store did not answer: the gateway replies 503. Its text, which may name
    addresses and keys, is for the log; a client is told ``public``."""

    public = "a service the gateway needs is unavailable; retry shortly"


class Overloaded(Unavailable):
    """A stage is answering all the calls it admits: the gateway replies 429, a batch item waits."""

    public = "the services are answering all the requests they admit; retry shortly"


class store_errors:
    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if isinstance(error, StoreUnavailable):
            raise Unavailable(str(error)) from None
        return False
