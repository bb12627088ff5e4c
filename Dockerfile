# syntax=docker/dockerfile:1

# Build stage. Every target Cargo.toml declares (the binary, the library, the
# benches and tests it names) must exist for cargo to read the manifest, so
# the stage copies the whole package; tests/offline/dockerfile.rs lays out
# exactly what these COPY lines copy and has cargo check it. The cache mounts
# keep the registry and the compiled dependencies between builds, so a change
# to the sources recompiles only the crate.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY config config
COPY benches benches
COPY tests tests
# The image carries a stripped binary without line tables (~40 MB instead of
# ~390 MB); local release builds keep them for profiling.
ENV CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=symbols
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin login-metrics \
 && cp target/release/login-metrics /usr/local/bin/login-metrics

# Runtime stage: the binary and nothing else. Its configuration defaults are
# compiled in (config/default.toml); settings come from LOGIN_METRICS__*
# variables or a file given with --config. librdkafka and OpenSSL are linked
# statically; the binary needs libc, libm, libgcc_s and zlib (libz.so.1), all
# in the base image.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin login-metrics \
 && mkdir -p /data \
 && chown 10001:10001 /data
COPY --from=build /usr/local/bin/login-metrics /usr/local/bin/login-metrics
USER 10001
WORKDIR /data
ENV LOGIN_METRICS__METRICS_LOG__PATH=/data/login-metrics.log \
    LOGIN_METRICS__TELEMETRY__LISTEN=0.0.0.0:9464
EXPOSE 9464
# `health` asks the listener telemetry.listen names (on loopback when it is a
# wildcard address), so moving the listener keeps the check working.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["login-metrics", "health"]
ENTRYPOINT ["login-metrics"]
CMD ["run"]
