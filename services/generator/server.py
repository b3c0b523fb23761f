"""gRPC server around ``dartserve.stages.DecodeStep``."""

from __future__ import annotations

from dataclasses import replace

from dartserve.stages import DecodeStep
from services.convert import sampling_from_proto, to_message
from services.grpc_server import Server, caller_waiting, check_deadline, status_codes
from services.rpc.dartserve.v1 import generator_pb2, generator_pb2_grpc

SERVICE = generator_pb2.DESCRIPTOR.services_by_name["GeneratorService"].full_name


class GeneratorServicer(generator_pb2_grpc.GeneratorServiceServicer):
    def __init__(self, step: DecodeStep) -> None:
        self.step = step

    def Generate(self, request, context):
        check_deadline(context)
        with status_codes(context):
            chunks = self._decode(request, context)
            # gRPC stops pulling from this generator when the call is cancelled or past its
            # deadline, and closing ``chunks`` then ends the decode: no token more is computed.
            try:
                for chunk in chunks:
                    yield to_message(chunk, generator_pb2.GenerateChunk)
            finally:
                chunks.close()

    def Complete(self, request, context):
        check_deadline(context)
        tokens, texts = [], []
        with status_codes(context):
            # A caller that went away or whose deadline passed stops the decode at its next token.
            chunks = self._decode(request, context)
            try:
                for chunk in chunks:
                    tokens += chunk.token_ids
                    texts.append(chunk.text)
            finally:
                chunks.close()
        return to_message(replace(chunk, token_ids=tokens, text="".join(texts)), generator_pb2.GenerateChunk)

    def _decode(self, request, context):
        question = request.question if request.HasField("question") else None
        sampling = sampling_from_proto(request.sampling)
        return self.step.generate(request.kv_handle, sampling, request.pending_token, question, wanted=lambda: caller_waiting(context))


def serve(step: DecodeStep, settings, port: int) -> Server:
    return Server("generator", SERVICE, lambda server: generator_pb2_grpc.add_GeneratorServiceServicer_to_server(GeneratorServicer(step), server), settings, port)
