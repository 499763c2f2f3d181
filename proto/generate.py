"""Generate Python code from proto/ into gen/ (git-ignored). Run by `make setup`.

The googleapis protos (google/api, google/type, google/rpc) come from the
googleapis-common-protos wheel; protobuf's own come with grpcio-tools.
"""

from __future__ import annotations

import sys
from pathlib import Path

import google.type.date_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "gen"


def main() -> int:
    googleapis = Path(google.type.date_pb2.__file__).resolve().parent.parent.parent
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    OUT.mkdir(exist_ok=True)
    args = [
        "protoc",
        f"-I{ROOT / 'proto'}",
        f"-I{googleapis}",
        f"-I{well_known}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        *protos,
    ]
    code = protoc.main(args)
    if code != 0:
        print("protoc failed", file=sys.stderr)
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
