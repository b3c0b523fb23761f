"""The three stages over a store, in the test's process: what the gRPC backend drives
(``staged_answer``), without gRPC between them."""

from dartserve.stages import DecodeStep, PrefillStep, VisionStep
from services.frontend.errors import store_errors
from services.frontend.pipeline import staged_answer


class StagesInProcess:
    def __init__(self, vision: VisionStep, prefill: PrefillStep, decode: DecodeStep) -> None:
        self.vision, self.prefill_step, self.decode = vision, prefill, decode

    def answer(self, question, previous=None, stream=True):
        return staged_answer(self, question, previous, stream)

    def encode(self, images, conversation, tenant=""):
        with store_errors():
            return self.vision.encode(images, conversation, cache_scope=tenant)

    def prefill(self, prompt_ref, pruning, sampling, image_hashes=()):
        with store_errors():
            return self.prefill_step.prefill(prompt_ref, pruning, sampling, image_hashes)

    def generate(self, kv_handle, sampling, pending, question=None, stream=True):
        with store_errors():
            yield from self.decode.generate(kv_handle, sampling, pending, question)
