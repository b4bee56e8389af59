# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, ship only the static-ish binary and the
# default config on a distroless base, as a non-root user.

FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --bin scopegate || true
COPY src ./src
COPY config ./config
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin scopegate

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/scopegate /usr/local/bin/scopegate
COPY --from=build /src/config/scopegate.toml /etc/scopegate/scopegate.toml
ENV SCOPEGATE_CONFIG=/etc/scopegate/scopegate.toml \
    SCOPEGATE_LOG_FORMAT=json \
    SCOPEGATE_SCOPES__PATH=/var/lib/scopegate/scopes.db
USER nonroot:nonroot
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/scopegate"]
CMD ["run"]
