#!/usr/bin/env bash
# Runs every check and test outpost has. Installs what the tests need
# (Debian packages) when missing. Usage: bash tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v swaks >/dev/null || need+=(swaks)
perl -MNet::SSLeay -e1 2>/dev/null || need+=(libnet-ssleay-perl)
[ -x /usr/bin/python3 ] || need+=(python3)
command -v openssl >/dev/null || need+=(openssl)
/usr/bin/python3 -c 'import aiosmtpd' 2>/dev/null || need+=(python3-aiosmtpd)
[ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
[ -x /usr/sbin/postfix ] || need+=(postfix)
command -v fetchmail >/dev/null || need+=(fetchmail)
command -v mpop >/dev/null || need+=(mpop)
command -v mbsync >/dev/null || need+=(isync)
command -v curl >/dev/null || need+=(curl)
command -v faketime >/dev/null || need+=(faketime)
command -v systemd-analyze >/dev/null || need+=(systemd)
# tests/package.sh installs the package into a clean Debian root.
command -v debootstrap >/dev/null || need+=(debootstrap)
# The status page is checked in a real browser (tests/status_page.rs).
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Postfix as a private instance only: "No configuration" writes no main.cf,
  # so nothing listens on port 25; the tests run their own instances.
  echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1 || {
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
  }
fi

# Each phase says how long it took: the whole run is meant to stay
# within about 20 minutes on a two-core machine.
phase() {
  local name=$1 start=$SECONDS
  shift
  "$@"
  echo "run.sh: $name took $((SECONDS - start))s (total $((SECONDS))s)"
}

phase fmt cargo fmt --all -- --check
phase clippy cargo clippy --all-targets -- -D warnings
phase tests cargo test --all-targets

# The fuzz targets, briefly each (FUZZ_SECONDS, here 20 to keep the run
# within its time; longer runs: bash tests/fuzz.sh); skipped without nightly.
export FUZZ_SECONDS=${FUZZ_SECONDS:-20}
phase fuzz bash tests/fuzz.sh

# The Debian package: built and inspected.
phase package bash tests/package.sh
