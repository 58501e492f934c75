# Multi-stage build of lockd, lockctl and the example scheduler, in one image. The Lua scripts
# and the proto descriptor are compiled into the binaries, and protox replaces protoc, so the
# build needs nothing beyond Rust (and a C compiler for ring, which the rust image has).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --features lockd/otlp -p lockd -p lockctl -p lockd-scheduler-example

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home lockd
COPY --from=build /src/target/release/lockd /src/target/release/lockctl \
     /src/target/release/lockd-scheduler-example /usr/local/bin/
# The black-box check that docker-compose.yml's `tests` service runs (scripts/stack runs it too).
COPY scripts/stack-check /usr/local/bin/lockd-stack-check
USER lockd
# The binary's default is loopback; in a container, listen on every interface.
ENV LOCKD_LISTEN=0.0.0.0:50051
EXPOSE 50051
# gRPC health (grpc.health.v1, service lockd.v1.LockService): unhealthy while Redis is
# unreachable. Containers of this image that run something else disable it (see compose).
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
  CMD ["lockctl", "--endpoint", "http://127.0.0.1:50051", "--timeout", "2s", "health"]
ENTRYPOINT ["lockd"]
