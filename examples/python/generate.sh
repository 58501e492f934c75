#!/usr/bin/env bash
# Generates the Python gRPC stubs for lockd from proto/ into examples/python/gen/ (not committed).
# Works from any directory. Needs grpcio-tools (it bundles protoc and the well-known types):
#   python3 -m pip install grpcio grpcio-tools
# Set PYTHON to use another interpreter (default: python3).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
proto="$(cd "$here/../../proto" && pwd)"
python="${PYTHON:-python3}"

if ! "$python" -c 'import grpc, grpc_tools' >/dev/null 2>&1; then
  echo "generate.sh: grpcio and grpcio-tools are not installed for $python." >&2
  echo "Install them with: $python -m pip install grpcio grpcio-tools" >&2
  exit 1
fi

# Generate into a scratch directory, then rename each file into gen/: a rename replaces a file
# atomically, so a process importing the stubs meanwhile (say, a concurrent test) never sees
# half a file.
tmp="$(mktemp -d "$here/.gen.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
"$python" -m grpc_tools.protoc -I "$proto" \
  --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  lockd/v1/lock.proto
mkdir -p "$here/gen/lockd/v1"
for f in "$tmp"/lockd/v1/*; do
  mv -f "$f" "$here/gen/lockd/v1/"
done
echo "generate.sh: stubs written to $here/gen (import them as: from lockd.v1 import lock_pb2)"
