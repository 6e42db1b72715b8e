# Cohort container image.
#
#   docker build -t cohort .
#   mkdir deploy && cp config/cohort.toml deploy/   # then edit listen.addr and the upstreams
#   docker run -p 8080:8080 --stop-timeout 40 -v "$PWD/deploy:/etc/cohort:ro" \
#     -v cohort-state:/var/lib/cohort cohort
#
# The image carries no config: mount a directory holding cohort.toml at
# /etc/cohort (config/cohort.toml is a commented example, made for
# `cohort demo`: it listens on loopback and points at the demo's upstreams). A directory,
# not the file alone: an editor that saves by replacing the file would leave
# a single-file mount on the old one, and SIGHUP would reload that.
# --stop-timeout gives SIGTERM's drain (listen.drain_timeout, 30s by
# default) time to finish before Docker's SIGKILL (10s by default). Its listen.addr must be
# 0.0.0.0:8080 to be reachable through a published port. The HEALTHCHECK
# probes GET /health on 127.0.0.1:9901 from inside the container, so
# admin.addr must be 127.0.0.1:9901 or 0.0.0.0:9901; a non-loopback
# admin.addr needs a token (admin.token_file or COHORT_ADMIN_TOKEN).
# Relative state paths land in /var/lib/cohort, the working directory: mount
# a volume there (cohort-state above), or a re-created container forgets the
# live state (rollbacks, promotions) and starts from the config again.

# --- build ---------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src

# Dependency layer: build the dependencies against stub sources, so that a
# change to the code alone does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && for b in $(sed -n '/^\[\[bench\]\]/,/^name/s/^name = "\(.*\)"$/\1/p' Cargo.toml); do echo 'fn main() {}' > "benches/$b.rs"; done \
 && cargo build --release --locked \
 && rm -rf src benches

COPY build.rs ./
COPY src ./src
COPY benches ./benches
# The demo embeds config/cohort.toml and the tests the example plans.
COPY config ./config
ARG COHORT_GIT_COMMIT=unknown
ENV COHORT_GIT_COMMIT=${COHORT_GIT_COMMIT}
# touch: the stub build left newer artefacts than the copied sources' mtimes.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin cohort \
 && install -m 0755 target/release/cohort /usr/local/bin/cohort

# --- runtime -------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/cohort --shell /usr/sbin/nologin cohort \
 && mkdir -p /etc/cohort /var/lib/cohort \
 && chown cohort:cohort /var/lib/cohort

COPY --from=builder /usr/local/bin/cohort /usr/local/bin/cohort
# Numeric, so that Kubernetes' runAsNonRoot can tell it is not root.
USER 10001:10001
WORKDIR /var/lib/cohort
EXPOSE 8080 9901
VOLUME ["/etc/cohort", "/var/lib/cohort"]

# admin.addr must be reachable from inside the container (see the top of this file).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9901/health || exit 1

ENTRYPOINT ["cohort"]
CMD ["serve", "--config", "/etc/cohort/cohort.toml"]
