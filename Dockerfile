# Multi-stage build: compile with the Rust toolchain, run on a slim Debian
# as a non-root user. The binary embeds its migrations, Lua scripts and
# panels: every directory an include_str!/include_bytes!/sqlx::migrate!
# reads must be copied here (tests/operations.rs checks it).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY lua lua
COPY migrations migrations
COPY config config
COPY web/billing web/billing
COPY web/vendor web/vendor
COPY assets assets
RUN cargo build --release --locked --bin creditgate

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /nonexistent --shell /usr/sbin/nologin creditgate
COPY --from=build /src/target/release/creditgate /usr/local/bin/creditgate
COPY config/creditgate.toml /etc/creditgate/creditgate.toml
ENV CREDITGATE_CONFIG=/etc/creditgate/creditgate.toml
USER 10001
EXPOSE 8207 9207
HEALTHCHECK --interval=10s --timeout=2s --retries=3 \
  CMD curl -fs http://127.0.0.1:8207/healthz || exit 1
ENTRYPOINT ["creditgate"]
CMD ["serve"]
