"""gRPC server around ``dartserve.stages.VisionStep``."""

from __future__ import annotations

from dartserve.stages import VisionStep
from services.convert import to_message
from services.grpc_server import Server, caller_waiting, check_deadline, status_codes
from services.rpc.dartserve.v1 import vision_pb2, vision_pb2_grpc

SERVICE = vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name


class VisionServicer(vision_pb2_grpc.VisionServiceServicer):
    def __init__(self, step: VisionStep) -> None:
        self.step = step

    def Encode(self, request, context):
        check_deadline(context)
        with status_codes(context):
            conversation = [{"role": t.role, "content": t.content} for t in request.conversation]
            encoded = self.step.encode(list(request.images), conversation, wanted=lambda: caller_waiting(context), cache_scope=request.cache_scope)
        return to_message(encoded, vision_pb2.EncodeResponse)


def serve(step: VisionStep, settings, port: int) -> Server:
    return Server("vision", SERVICE, lambda server: vision_pb2_grpc.add_VisionServiceServicer_to_server(VisionServicer(step), server), settings, port)
