"""The generated protobuf and gRPC stubs match meterd.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "common" / "proto").mkdir(parents=True)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out}",
         f"--pyi_out={out}", f"--grpc_python_out={out}", "common/proto/meterd.proto"],
        check=True,
    )
    for name in ("meterd_pb2.py", "meterd_pb2.pyi", "meterd_pb2_grpc.py"):
        generated = (out / "common" / "proto" / name).read_text()
        committed = (ROOT / "common" / "proto" / name).read_text()
        assert generated == committed, f"common/proto/{name} is stale: regenerate it"
