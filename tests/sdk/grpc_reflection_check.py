"""Lists tollgate's gRPC services over both server reflection versions with grpcio-reflection.

Usage: grpc_reflection_check.py HOST:PORT

Older tools and client libraries only speak grpc.reflection.v1alpha; newer ones speak v1. Each
version this grpcio-reflection has a stub for (v1alpha always; v1 only in some releases, and the
Rust test `grpc_reflection_lists_and_describes_services` checks it with tonic's client) must list tollgate.v1.Gateway and serve the file that defines it. Prints
"N passed, 0 failed" and exits non-zero on any failure.
"""

import sys

import grpc
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc

try:
    from grpc_reflection.v1 import reflection_pb2 as v1_pb2
    from grpc_reflection.v1 import reflection_pb2_grpc as v1_grpc
except ImportError:  # grpcio-reflection ships only the v1alpha stub; v1 is checked in Rust
    v1_pb2 = v1_grpc = None


def check(name, pb2, stub_cls, channel):
    stub = stub_cls.ServerReflectionStub(channel)
    requests = [
        pb2.ServerReflectionRequest(list_services=""),
        pb2.ServerReflectionRequest(file_containing_symbol="tollgate.v1.Gateway"),
    ]
    answers = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    assert len(answers) == 2, f"{name}: {len(answers)} answers"
    listed = [s.name for s in answers[0].list_services_response.service]
    for want in ("tollgate.v1.Gateway", "grpc.health.v1.Health"):
        assert want in listed, f"{name}: {want} not in {listed}"
    files = answers[1].file_descriptor_response.file_descriptor_proto
    assert files, f"{name}: no descriptor for tollgate.v1.Gateway: {answers[1]}"
    assert any(b"StreamComplete" in f for f in files), f"{name}: Gateway not described"


def main():
    target = sys.argv[1]
    channel = grpc.insecure_channel(target)
    passed = failed = 0
    versions = [("v1alpha", v1alpha_pb2, v1alpha_grpc)]
    if v1_pb2 is None:
        print("skip v1: this grpcio-reflection has no v1 stub")
    else:
        versions.append(("v1", v1_pb2, v1_grpc))
    for name, pb2, stub in versions:
        try:
            check(name, pb2, stub, channel)
            print(f"ok {name}")
            passed += 1
        except Exception as e:  # report every version, not just the first failure
            print(f"FAIL {name}: {e!r}")
            failed += 1
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
