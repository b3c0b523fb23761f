"""gRPC server around ``dartserve.stages.PrefillStep``."""

from __future__ import annotations

import json

from dartserve.stages import PrefillStep
from services.convert import pruning_from_proto, sampling_from_proto
from services.grpc_server import Server, check_deadline, status_codes
from services.rpc.dartserve.v1 import pruner_pb2, pruner_pb2_grpc

SERVICE = pruner_pb2.DESCRIPTOR.services_by_name["PrunerService"].full_name


class PrunerServicer(pruner_pb2_grpc.PrunerServiceServicer):
    def __init__(self, step: PrefillStep) -> None:
        self.step = step

    def Prefill(self, request, context):
        check_deadline(context)
        with status_codes(context):
            done = self.step.prefill(
                request.prompt_ref, pruning_from_proto(request.pruning), sampling_from_proto(request.sampling), list(request.image_hashes)
            )
        return pruner_pb2.PrefillResponse(
            kv_handle=done.kv_handle,
            first_token=done.first_token,
            first_text=done.first_text,
            finish_reason=done.finish_reason,
            prompt_tokens=done.prompt_tokens,
            vision_tokens=done.vision_tokens,
            kept_vision_tokens=done.kept_vision_tokens,
            kv_bytes=done.kv_bytes,
            prefill_ms=done.prefill_ms,
            selection_ms=done.selection_ms,
            pruning_json=json.dumps(done.pruning),
            kv_store_ms=done.kv_store_ms,
        )


def serve(step: PrefillStep, settings, port: int) -> Server:
    return Server("pruner", SERVICE, lambda server: pruner_pb2_grpc.add_PrunerServiceServicer_to_server(PrunerServicer(step), server), settings, port)
