# One image per service: docker build --build-arg SERVICE=click-service .
FROM rust:1-bookworm AS build
ARG SERVICE
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ${SERVICE} && cp target/release/${SERVICE} /service

FROM debian:bookworm-slim
# CA roots: postback-service's HTTP client loads the system's at start (and an
# affiliate's https postback URL needs them).
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 tracker && mkdir /data && chown tracker /data
COPY --from=build /service /usr/local/bin/service
USER tracker
ENV DATA_DIR=/data
VOLUME /data
ENTRYPOINT ["/usr/local/bin/service"]
