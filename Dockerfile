# syntax=docker/dockerfile:1
# tollgate: multi-stage build. The builder compiles the release binary (the
# protobuf files are compiled by build.rs with protox, so no protoc is needed);
# the runtime image holds the binary, CA certificates and a default config.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# Cache the registry and target dir between builds (BuildKit); copy the binary
# out of the cache mount so the next stage can see it. The release profile keeps
# debug info (for profiling); the image ships the binary without it: the debug
# info is split off into tollgate.debug (linked by --add-gnu-debuglink, so gdb and
# perf find it when it sits next to the binary) and the shipped binary stripped.
#   docker build --target debuginfo --output type=local,dest=out .   # out/tollgate.debug
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --bin tollgate \
    && install -D -m 0755 target/release/tollgate /out/tollgate \
    && objcopy --only-keep-debug /out/tollgate /out/tollgate.debug \
    && strip --strip-debug --strip-unneeded /out/tollgate \
    && objcopy --add-gnu-debuglink=/out/tollgate.debug /out/tollgate \
    && ls -l /out

# The split-off debug info, for `docker build --target debuginfo --output ...`.
FROM scratch AS debuginfo
COPY --from=builder /out/tollgate.debug /tollgate.debug

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --user-group --uid 10001 --home-dir /var/lib/tollgate --create-home \
        --shell /usr/sbin/nologin tollgate
COPY --from=builder /out/tollgate /usr/local/bin/tollgate
COPY deploy/tollgate.toml /etc/tollgate/tollgate.toml
ENV TOLLGATE_CONFIG=/etc/tollgate/tollgate.toml \
    TOLLGATE_HTTP_ADDR=0.0.0.0:8080 \
    TOLLGATE_GRPC_ADDR=0.0.0.0:50051
# Numeric, so that Kubernetes' runAsNonRoot can verify it (deploy/kubernetes/).
USER 10001:10001
WORKDIR /var/lib/tollgate
EXPOSE 8080 50051
STOPSIGNAL SIGTERM
ENTRYPOINT ["tollgate"]
CMD ["serve", "--config", "/etc/tollgate/tollgate.toml"]
