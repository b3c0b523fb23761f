"""gRPC server around ``dartserve.stages.PrefillStep``."""

from __future__ import annotations

import json

from dartserve.stages import PrefillStep
from services.convert import pruning_from_proto, sampling_from_proto, to_message
from services.grpc_server import Server, caller_waiting, check_deadline, status_codes
from services.rpc.dartserve.v1 import pruner_pb2, pruner_pb2_grpc

SERVICE = pruner_pb2.DESCRIPTOR.services_by_name["PrunerService"].full_name


class PrunerServicer(pruner_pb2_grpc.PrunerServiceServicer):
    def __init__(self, step: PrefillStep) -> None:
        self.step = step

    def Prefill(self, request, context):
        check_deadline(context)
        with status_codes(context):
            done = self.step.prefill(
                request.prompt_ref,
                pruning_from_proto(request.pruning),
                sampling_from_proto(request.sampling),
                list(request.image_hashes),
                wanted=lambda: caller_waiting(context),
            )
        return to_message(done, pruner_pb2.PrefillResponse, drop=("pruning",), pruning_json=json.dumps(done.pruning))


def serve(step: PrefillStep, settings, port: int) -> Server:
    return Server("pruner", SERVICE, lambda server: pruner_pb2_grpc.add_PrunerServiceServicer_to_server(PrunerServicer(step), server), settings, port)
