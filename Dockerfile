# syntax=docker/dockerfile:1
#
# nllb agent image: a Debian slim base with only the `nllb` binary (plus the
# CA bundle, and the shell/mount/stat the DaemonSet's bpffs init step uses).
#
#   docker build -t ghcr.io/nllb/nllb:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64,linux/arm/v7 \
#       -t ghcr.io/nllb/nllb:0.1.0 --push .
#
# Building the eBPF programs needs a nightly toolchain with rust-src and
# bpf-linker built against that nightly's own LLVM (see docs/deploy.md);
# the builder stage sets both up, the same way `cargo xtask setup` does.
#
# Multi-platform builds need no emulation: the builder runs on the build
# machine's platform ($BUILDPLATFORM) and cross-compiles for $TARGETPLATFORM
# with Debian's cross gcc, exactly as `cargo xtask build --target` does
# (xtask/src/arch.rs: rustup target, gcc-<gnu> + libc6-dev-<arch>-cross,
# CARGO_TARGET_<TRIPLE>_LINKER / CC_<triple> / AR_<triple>). The eBPF object
# is the same bpfel object on every platform. The final stage runs nothing
# (no RUN), so no step executes a foreign binary.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM --platform=$BUILDPLATFORM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
# Set by buildx (and by plain `docker build` to the engine's own platform).
ARG TARGETPLATFORM
ARG TARGETARCH
ARG TARGETVARIANT
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
# The target platform as Rust, GNU and Debian name it; a cross compiler
# and the target's C library (ring has C code) unless it is the builder's own.
# hadolint ignore=DL3008
RUN case "${TARGETARCH}${TARGETVARIANT}" in \
      amd64)  triple="x86_64-unknown-linux-gnu";     gnu="x86_64-linux-gnu";    deb="amd64"; gcc="gcc-x86-64-linux-gnu" ;; \
      arm64)  triple="aarch64-unknown-linux-gnu";    gnu="aarch64-linux-gnu";   deb="arm64"; gcc="gcc-aarch64-linux-gnu" ;; \
      armv7)  triple="armv7-unknown-linux-gnueabihf"; gnu="arm-linux-gnueabihf"; deb="armhf"; gcc="gcc-arm-linux-gnueabihf" ;; \
      *) echo "unsupported platform ${TARGETPLATFORM}: nllb builds for linux/amd64, linux/arm64, linux/arm/v7" >&2; exit 1 ;; \
    esac \
 && host="$(rustc -vV | sed -n 's/^host: //p')" \
 && { echo "triple=${triple}"; echo "gnu=${gnu}"; echo "cross=$([ "${triple}" = "${host}" ] && echo no || echo yes)"; } > /opt/target.env \
 && if [ "${triple}" != "${host}" ]; then \
      rustup target add "${triple}" \
      && apt-get update \
      && apt-get install -y --no-install-recommends "${gcc}" "libc6-dev-${deb}-cross" \
      && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    triple='' gnu='' cross='' \
 && . /opt/target.env \
 && if [ "${cross}" = yes ]; then \
      upper="$(echo "${triple}" | tr 'a-z-' 'A-Z_')" && lower="$(echo "${triple}" | tr '-' '_')" \
      && export "CARGO_TARGET_${upper}_LINKER=${gnu}-gcc" "CC_${lower}=${gnu}-gcc" "AR_${lower}=${gnu}-ar"; \
    fi \
 && cargo build --release --locked -p nllb-userspace --bin nllb --target "${triple}" \
 && install -D -m 0755 "target/${triple}/release/nllb" /out/nllb \
 && install -D -m 0644 /etc/ssl/certs/ca-certificates.crt /out/ca-certificates.crt

# The target platform's image (buildx picks it); the same Debian release as
# the builder, so the binary's glibc is there.
FROM debian:${DEBIAN_RELEASE}-slim
# The CA bundle comes from the builder (the same Debian release's current
# ca-certificates, installed in rust:*-bookworm): certificates are the same
# on every platform, and copying them needs no emulated apt-get here.
COPY --from=builder /out/nllb /usr/local/bin/nllb
COPY --from=builder /out/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
LABEL org.opencontainers.image.title="nllb" \
      org.opencontainers.image.description="In-kernel node-local load balancer for Kubernetes workers" \
      org.opencontainers.image.licenses="Apache-2.0"
# The agent must run as root (uid 0) with the capabilities the DaemonSet
# grants; a non-root uid cannot reach the root-only pin directory.
# hadolint ignore=DL3002
USER 0:0
ENTRYPOINT ["/usr/local/bin/nllb"]
CMD ["agent", "--config", "/etc/nllb/config.yaml"]
