#!/usr/bin/env python3
"""A Faultline memory policy in Python: 4 KiB mappings with a fault-around
window, and (with --consult) the same answer per fault through Consult.

Generate the gRPC stubs once (Debian: apt install python3-grpcio
python3-protobuf protobuf-compiler protobuf-compiler-grpc):

    mkdir -p gen && protoc -I proto --python_out=gen --grpc_out=gen \\
        --plugin=protoc-gen-grpc=/usr/bin/grpc_python_plugin \\
        faultline/v1/faultline.proto faultline/v1/policy.proto

then run it and swap it in:

    PYTHONPATH=gen python3 docs/examples/policy.py --listen 127.0.0.1:50161
    faultline policy use http://127.0.0.1:50161

The contract (docs/policies.md): Describe answers who the policy is (and is
the daemon's heartbeat); WatchRules sends a rule set at once and keeps the
stream open, since an ended stream drops the policy; Consult answers within
the daemon's deadline (2 ms by default) or is ignored.
"""

import argparse
import threading
from concurrent import futures

import grpc

from faultline.v1 import faultline_pb2, policy_pb2, policy_pb2_grpc


class WindowPolicy(policy_pb2_grpc.MemoryPolicyServicer):
    """4 KiB mappings, `window` pages mapped after each faulting one."""

    def __init__(self, window: int, consult: bool):
        self.window = window
        self.consult = consult
        rule = policy_pb2.Rule(
            max_mapping_size=faultline_pb2.MAPPING_SIZE_4K,
            fault_around_pages=window,
            consult=consult,
        )
        self.rules = policy_pb2.RuleSet(generation=1, rules=[rule])

    def Describe(self, request, context):
        decisions = [policy_pb2.DECISION_MAPPING_SIZE, policy_pb2.DECISION_FAULT_AROUND]
        if self.consult:
            decisions.append(policy_pb2.DECISION_CONSULT)
        return policy_pb2.PolicyDescription(name="python-window", version="0.1.0", decisions=decisions)

    def WatchRules(self, request, context):
        yield self.rules
        # The open stream is the policy's lease: hold it until the daemon
        # goes away (or publish new sets here as the policy learns).
        done = threading.Event()
        context.add_callback(done.set)
        done.wait()

    def Consult(self, request, context):
        return policy_pb2.ConsultResponse(
            max_mapping_size=faultline_pb2.MAPPING_SIZE_4K,
            fault_around_pages=self.window,
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:50161", help="host:port (port 0: any free port)")
    parser.add_argument("--window", type=int, default=7, help="pages mapped after the faulting one (0..=64)")
    parser.add_argument("--consult", action="store_true", help="have the daemon ask per fault")
    args = parser.parse_args()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    policy_pb2_grpc.add_MemoryPolicyServicer_to_server(WindowPolicy(args.window, args.consult), server)
    host = args.listen.rsplit(":", 1)[0]
    port = server.add_insecure_port(args.listen)
    server.start()
    print(f"LISTENING http://{host}:{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
