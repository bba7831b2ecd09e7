#!/usr/bin/env bash
# Regenerates mpcdp/proto/*_pb2*.py and their typed stubs (*_pb2*.pyi, by mypy-protobuf's
# protoc-gen-mypy and protoc-gen-mypy_grpc, found on PATH) from protos/mpcdp/proto/*.proto
# (run from the repo root).
# CI runs this and fails on any diff (tests/project/test_proto.py), so commit the output.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
python -m grpc_tools.protoc -Iprotos --python_out="$out" --mypy_out="$out" \
  --grpc_python_out="$out" --mypy_grpc_out="$out" \
  protos/mpcdp/proto/*.proto
