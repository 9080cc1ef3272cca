#!/usr/bin/env bash
# Builds the .deb and checks what it holds. Run by tests/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/package.sh >/tmp/outpost-package.log 2>&1 || { cat /tmp/outpost-package.log; exit 1; }
deb=$(ls -t target/debian/outpost_*.deb | head -1)
contents=$(dpkg-deb -c "$deb")
info=$(dpkg-deb -I "$deb")
fail() { echo "package test: $*" >&2; exit 1; }
for path in ./usr/bin/outpost ./etc/outpost/outpost.toml ./lib/systemd/system/outpost.service \
    ./lib/systemd/system/outpost-flush.service ./lib/systemd/system/outpost-flush.timer \
    ./usr/lib/sysusers.d/outpost.conf ./usr/lib/tmpfiles.d/outpost.conf \
    ./usr/share/man/man1/outpost.1.gz ./usr/share/man/man1/outpost-flush.1.gz \
    ./usr/share/doc/outpost/README.md ./usr/share/doc/outpost/CONFIG.md \
    ./etc/NetworkManager/dispatcher.d/90-outpost-flush \
    ./etc/networkd-dispatcher/routable.d/50-outpost-flush; do
  grep -qF " $path" <<<"$contents" || fail "missing $path"
done
grep -qE '^l.* \./usr/sbin/sendmail -> \.\./bin/outpost$' <<<"$contents" || fail "no /usr/sbin/sendmail link"
grep -qE '^l.* \./usr/bin/mailq -> outpost$' <<<"$contents" || fail "no /usr/bin/mailq link"
grep -qE '^-rw-r----- .* \./etc/outpost/outpost.toml$' <<<"$contents" || fail "the configuration is not mode 640"
grep -q 'Provides: mail-transport-agent' <<<"$info" || fail "does not provide mail-transport-agent"
grep -q 'Conflicts: mail-transport-agent' <<<"$info" || fail "does not conflict with other MTAs"
grep -q ' postinst' <<<"$info" || fail "no postinst"
grep -q '/etc/outpost/outpost.toml' < <(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles) || fail "configuration is not a conffile"
# The shipped configuration is the production example and is valid.
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$deb" "$tmp"
cmp -s "$tmp/etc/outpost/outpost.toml" config/production.example.toml || fail "etc/outpost/outpost.toml differs from the production example"
"$tmp/usr/bin/outpost" check-config --config "$tmp/etc/outpost/outpost.toml" >/dev/null || fail "shipped configuration does not check"
size=$(stat -c %s "$tmp/usr/bin/outpost")
[ "$size" -lt 40000000 ] || fail "binary not stripped ($size bytes)"
echo "package ok: $deb ($(du -h "$deb" | cut -f1))"
