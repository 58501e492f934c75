#!/usr/bin/env bash
# Generates the Python gRPC stubs for lockd from proto/ into src/lockd/v1/ (committed, so that
# `pip install client/python` needs no code generator). With --check, generates into a scratch
# directory and fails if the committed stubs differ (the version lines of the generator aside):
# tests/python.rs runs that, so a proto change without regenerated stubs fails CI.
# Works from any directory. Needs grpcio-tools: python3 -m pip install grpcio-tools
# Set PYTHON to use another interpreter (default: python3).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
proto="$(cd "$here/../../proto" && pwd)"
python="${PYTHON:-python3}"
out="$here/src/lockd/v1"

if ! "$python" -c 'import grpc_tools' >/dev/null 2>&1; then
  echo "generate.sh: grpcio-tools is not installed for $python." >&2
  echo "Install it with: $python -m pip install grpcio-tools" >&2
  exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$python" -m grpc_tools.protoc -I "$proto" \
  --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  lockd/v1/lock.proto

# The generator's own version appears in a few lines; they change with grpcio-tools, not proto/.
strip_versions() {
  sed -e '/ValidateProtobufRuntimeVersion(/,/^)/d' -e '/Protobuf Python Version/d' \
    -e '/GRPC_GENERATED_VERSION = /d' "$1"
}

if [ "${1:-}" = "--check" ]; then
  stale=0
  for f in lock_pb2.py lock_pb2.pyi lock_pb2_grpc.py; do
    if ! diff -q <(strip_versions "$tmp/lockd/v1/$f") <(strip_versions "$out/$f") >/dev/null; then
      echo "generate.sh: $out/$f is stale: run client/python/generate.sh and commit it" >&2
      stale=1
    fi
  done
  exit "$stale"
fi
for f in lock_pb2.py lock_pb2.pyi lock_pb2_grpc.py; do
  mv -f "$tmp/lockd/v1/$f" "$out/$f"
done
echo "generate.sh: stubs written to $out"
