# syntax=docker/dockerfile:1

# Build stage: dependencies are compiled in their own layer, so a change to
# the sources rebuilds only the crate itself.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > benches/pipeline.rs \
 && cargo build --release --locked \
 && rm -rf src benches
COPY src src
COPY config config
COPY benches benches
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin login-metrics

# Runtime stage: the binary, its configuration and nothing else. The binary
# links only libc and libgcc_s (librdkafka and zlib are static), both in the base.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin login-metrics \
 && mkdir -p /data \
 && chown 10001:10001 /data
COPY --from=build /src/target/release/login-metrics /usr/local/bin/login-metrics
COPY config /etc/login-metrics
USER 10001
WORKDIR /data
ENV LOGIN_METRICS__METRICS_LOG__PATH=/data/login-metrics.log \
    LOGIN_METRICS__TELEMETRY__LISTEN=0.0.0.0:9464
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["login-metrics", "health"]
ENTRYPOINT ["login-metrics"]
CMD ["run"]
