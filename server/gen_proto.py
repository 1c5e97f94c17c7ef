"""Regenerates the committed gRPC stubs from `jengine.proto` (needs grpcio-tools; run after editing the proto).

    python -m server.gen_proto            # from the repository root
    python -m server.gen_proto --check    # exit 1 if the committed stubs are stale

protoc writes `import jengine_pb2 as ...` into the service stub; it is rewritten to a package-relative
import so the stubs work as `jengine.server.jengine_pb2` (installed) and `server.jengine_pb2` (repo).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = "jengine.proto"
OUTPUTS = ("jengine_pb2.py", "jengine_pb2_grpc.py")


def generate(out_dir: str) -> dict[str, str]:
    """Runs protoc into `out_dir`; returns {file name: fixed source}."""
    from grpc_tools import protoc

    args = ["grpc_tools.protoc", f"-I{HERE}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", os.path.join(HERE, PROTO)]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    sources = {}
    for name in OUTPUTS:
        with open(os.path.join(out_dir, name)) as f:
            text = f.read()
        sources[name] = re.sub(r"^import jengine_pb2 as", "from . import jengine_pb2 as", text, flags=re.M)
    return sources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed stubs instead of writing")
    ns = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sources = generate(tmp)
    stale = []
    for name, text in sources.items():
        path = os.path.join(HERE, name)
        current = open(path).read() if os.path.exists(path) else None
        if current != text:
            stale.append(name)
            if not ns.check:
                with open(path, "w") as f:
                    f.write(text)
    if ns.check and stale:
        print(f"stale: {', '.join(stale)}; run python -m server.gen_proto", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
