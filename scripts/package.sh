#!/usr/bin/env bash
# Builds the Debian package: target/debian/outpost_VERSION_ARCH.deb
# Needs cargo-deb (installed here when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
cargo build --release
rm -rf target/man
target/release/outpost man target/man >/dev/null
cargo deb --no-build --strip "$@"
