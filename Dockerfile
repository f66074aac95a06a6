# syntax=docker/dockerfile:1
# tollgate: multi-stage build. The builder compiles the release binary (the
# protobuf files are compiled by build.rs with protox, so no protoc is needed);
# the runtime image holds the binary, CA certificates and a default config.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# Cache the registry and target dir between builds (BuildKit); copy the binary
# out of the cache mount so the next stage can see it.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --bin tollgate \
    && install -D -m 0755 target/release/tollgate /out/tollgate

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --user-group --home-dir /var/lib/tollgate --create-home \
        --shell /usr/sbin/nologin tollgate
COPY --from=builder /out/tollgate /usr/local/bin/tollgate
COPY deploy/tollgate.toml /etc/tollgate/tollgate.toml
ENV TOLLGATE_CONFIG=/etc/tollgate/tollgate.toml \
    TOLLGATE_HTTP_ADDR=0.0.0.0:8080 \
    TOLLGATE_GRPC_ADDR=0.0.0.0:50051
USER tollgate
WORKDIR /var/lib/tollgate
EXPOSE 8080 50051
STOPSIGNAL SIGTERM
ENTRYPOINT ["tollgate"]
CMD ["serve", "--config", "/etc/tollgate/tollgate.toml"]
