"""Answering a question through the stages: what the gateway and the batch worker share.

A question is checked and shaped here (``answers``, ``inputs``, ``prompt_limits``,
``image_urls``) and answered by a backend (``backends``): the engine in this process, or the
three gRPC stages.
"""
