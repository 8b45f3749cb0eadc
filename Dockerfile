# Shoal broker image: build with the same command as `make build`, run on
# a small Debian base as a non-root user.
#   docker build -t shoal .
#   docker run -p 8080:8080 shoal

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace

FROM debian:bookworm-slim
# ca-certificates: rediss:// and https webhooks verify against system roots.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/shoal --create-home shoal
COPY --from=build /src/target/release/shoal /usr/local/bin/shoal
COPY --from=build /src/target/release/loadgen /usr/local/bin/loadgen
USER 10001
ENV SHOAL_LISTEN=0.0.0.0:8080 \
    SHOAL_DATA=/var/lib/shoal
EXPOSE 8080
# SIGTERM starts the graceful shutdown (close 1001, drain, exit).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/shoal"]
