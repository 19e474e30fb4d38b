# syntax=docker/dockerfile:1
#
# nllb agent image: a Debian slim base with only the `nllb` binary (plus
# ca-certificates, and the shell/mount/stat the DaemonSet's bpffs init step
# uses).
#
#   docker build -t ghcr.io/nllb/nllb:0.1.0 .
#
# Building the eBPF programs needs a nightly toolchain with rust-src and
# bpf-linker built against that nightly's own LLVM (see docs/deploy.md);
# the builder stage sets both up, the same way `cargo xtask setup` does.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
# The nightly the eBPF crate is known to build with (LLVM 22): bpf-linker
# must link against exactly this LLVM, so it is pinned, not "latest".
ARG RUST_NIGHTLY=nightly-2026-05-19
ARG BPF_LINKER_VERSION=0.13.0
ENV CARGO_TERM_COLOR=never
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# aya-build runs `rustup run nightly`: install the pinned nightly under
# that name (rustup refuses to `link` a custom toolchain called "nightly").
RUN rustup toolchain install "${RUST_NIGHTLY}" --profile minimal --component rust-src \
 && host="$(rustc -vV | sed -n 's/^host: //p')" \
 && mv "${RUSTUP_HOME}/toolchains/${RUST_NIGHTLY}-${host}" "${RUSTUP_HOME}/toolchains/nightly-${host}" \
 && rustup run nightly rustc --version
# bpf-linker against the nightly's own libLLVM (no prebuilt bpf-linker or
# LLVM needed), with the LLVM feature matching that nightly's major version:
# the same steps as `cargo xtask setup`.
RUN sysroot="$(rustup run nightly rustc --print sysroot)" \
 && lib="$(ls "${sysroot}"/lib/libLLVM.so.*)" \
 && mkdir -p /opt/llvm/lib \
 && ln -s "${lib}" /opt/llvm/lib/libLLVM.so \
 && ln -s "${lib}" "/opt/llvm/lib/$(basename "${lib}")" \
 && llvm_major="$(rustup run nightly rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')" \
 && LLVM_PREFIX=/opt/llvm cargo install bpf-linker --version "${BPF_LINKER_VERSION}" \
      --no-default-features --features "llvm-${llvm_major}" --root /opt/bpf-linker \
 && /opt/bpf-linker/bin/bpf-linker --version
ENV PATH=/opt/bpf-linker/bin:${PATH}
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p nllb-userspace --bin nllb \
 && install -D -m 0755 target/release/nllb /out/nllb

FROM debian:${DEBIAN_RELEASE}-slim
# Unpinned on purpose: the release's current ca-certificates carries its
# security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/nllb /usr/local/bin/nllb
LABEL org.opencontainers.image.title="nllb" \
      org.opencontainers.image.description="In-kernel node-local load balancer for Kubernetes workers" \
      org.opencontainers.image.licenses="Apache-2.0"
# The agent must run as root (uid 0) with the capabilities the DaemonSet
# grants; a non-root uid cannot reach the root-only pin directory.
# hadolint ignore=DL3002
USER 0:0
ENTRYPOINT ["/usr/local/bin/nllb"]
CMD ["agent", "--config", "/etc/nllb/config.yaml"]
