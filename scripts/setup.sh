#!/usr/bin/env bash
# Installs what building and testing pg_sharding needs, skipping what is already there:
# Debian packages, cargo-pgrx 0.18.0, and `cargo pgrx init` against the system PostgreSQL 15.
# Safe to run again; on a ready machine it takes well under a second.
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
PGRX_VERSION=0.18.0
PACKAGES=(postgresql-15 postgresql-server-dev-15 libclang-dev clang libpq-dev pkg-config sudo make)

sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    sudo_if_needed apt-get update -qq
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
    echo "setup: cargo is not on PATH; install Rust (rustup) first" >&2
    exit 1
fi

if [ "$(cargo pgrx --version 2>/dev/null)" != "cargo-pgrx $PGRX_VERSION" ]; then
    echo "setup: installing cargo-pgrx $PGRX_VERSION (takes several minutes once)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked --no-default-features
fi

# Re-running init rewrites config.toml and forces a long bindgen rebuild: only when missing.
pgrx_config="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
if ! grep -q '^pg15 *=' "$pgrx_config" 2>/dev/null; then
    echo "setup: cargo pgrx init --pg15 $PG_CONFIG"
    cargo pgrx init --pg15 "$PG_CONFIG"
fi
