# syntax=docker/dockerfile:1
#
# scopegate image: build with the Rust toolchain, ship only the binary and its default
# config on distroless (glibc + libgcc + CA certificates, no shell, no package manager),
# running as the non-root user 65532.
#
#   docker build -t scopegate .
#   docker run --rm -p 8080:8080 -p 9090:9090 -e SCOPEGATE_ADMIN__LISTEN=0.0.0.0:9090 \
#     -e SCOPEGATE_ADMIN_TOKEN=… -v scopegate-data:/var/lib/scopegate scopegate
#
# Base images are pinned by tag. Pinning by digest (`image:tag@sha256:…`) is better —
# immutable, and rebuilds are reproducible — but no registry is reachable from where this
# file was written, so the digests could not be looked up: resolve them with
# `docker buildx imagetools inspect <image:tag>` and append them when you build for
# production. The Rust tag follows the toolchain the project is built and tested with
# (Cargo.toml's rust-version is the minimum).
#
# No HEALTHCHECK: Kubernetes probes /healthz and /readyz on the admin port
# (deploy/kubernetes/deployment.yaml), and the image has no shell or curl to run one.

FROM rust:1.95.0-bookworm AS build
WORKDIR /src

# 1. Dependencies only, so editing the sources does not rebuild them. The manifest names
#    a [[bench]] (benches/hot_path.rs) and cargo refuses a manifest whose bench file is
#    missing, so the stub layer creates it too.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs benches/hot_path.rs \
    && cargo build --release --locked --bin scopegate \
    && rm -rf src benches

# 2. The real sources. examples/ and tests/ are not needed to build the binary.
COPY src ./src
COPY benches ./benches
COPY config ./config
# Newer mtimes than the stub build, so cargo rebuilds the crate itself; then a data
# directory for the embedded store, owned by the runtime user.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin scopegate \
    && mkdir -p /out/var/lib/scopegate

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/scopegate /usr/local/bin/scopegate
COPY --from=build /src/config/scopegate.toml /etc/scopegate/scopegate.toml
# The embedded store's directory, writable by 65532. The default config's relative
# `scopes.path = "data/scopes.db"` lands in /var/lib/scopegate/data/scopes.db; the
# Kubernetes config uses /var/lib/scopegate/scopes.db on an emptyDir mounted here. Mount a
# volume here to keep the store across containers.
COPY --from=build --chown=65532:65532 /out/var/lib/scopegate /var/lib/scopegate
WORKDIR /var/lib/scopegate
ENV SCOPEGATE_CONFIG=/etc/scopegate/scopegate.toml \
    SCOPEGATE_LOG_FORMAT=json
# 65532 is `nonroot` in the distroless image; numeric, so runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/scopegate"]
CMD ["run"]
