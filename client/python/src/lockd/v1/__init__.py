"""The generated gRPC stubs of lockd.v1 (proto/lockd/v1/lock.proto), made by generate.sh."""
