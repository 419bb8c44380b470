# syntax=docker/dockerfile:1
# Build: docker build -t portcullis:0.1.0 .
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# cmake/clang are not needed: aws-lc-sys builds with the cc toolchain.
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ make \
    && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY policies ./policies
COPY benches ./benches
RUN cargo build --release --locked --bin portcullis \
    && strip target/release/portcullis

# distroless/cc: glibc, libgcc and the CA roots, nothing else (no shell).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/portcullis /usr/local/bin/portcullis
USER 65532:65532
EXPOSE 15443 15000
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["run", "--config", "/etc/portcullis/config/portcullis.toml"]
