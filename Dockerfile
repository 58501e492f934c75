# Multi-stage build of the lockd server. The Lua scripts and the proto descriptor are compiled
# into the binary, and protox replaces protoc, so the build needs nothing beyond Rust.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p lockd

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home lockd
COPY --from=build /src/target/release/lockd /usr/local/bin/lockd
USER lockd
# The binary's default is loopback; in a container, listen on every interface.
ENV LOCKD_LISTEN=0.0.0.0:50051
EXPOSE 50051
ENTRYPOINT ["lockd"]
