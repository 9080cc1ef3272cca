#!/usr/bin/env bash
# Builds the .deb and checks what it holds, then installs it into a clean
# Debian 12 root (debootstrap --variant=minbase, cached) and sends a
# message through it as an unprivileged user. Run by tests/run.sh, as root.
#
# The package conflicts with mail-transport-agent, and the test suite
# installs Postfix on this machine, so the package is never installed
# here: only inside the root, with its own /proc. The first run
# bootstraps the root from the mirror this machine's apt uses and keeps it
# in $OUTPOST_TEST_CACHE (default /var/cache/outpost-test/bookworm-root.tar);
# later runs unpack that.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
elapsed() { echo "$(($(date +%s) - started))s"; }
fail() { echo "package test: $*" >&2; exit 1; }

bash scripts/package.sh >/tmp/outpost-package.log 2>&1 || { cat /tmp/outpost-package.log; exit 1; }
deb=$(ls -t target/debian/outpost_*.deb | head -1)
echo "package built: $deb ($(elapsed))"
contents=$(dpkg-deb -c "$deb")
info=$(dpkg-deb -I "$deb")
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
# World-readable, like Postfix's main.cf: every user's sendmail reads it to
# find the submission socket; secrets live in the files it names.
grep -qE '^-rw-r--r-- (root/root|0/0) .* \./etc/outpost/outpost.toml$' <<<"$contents" ||
  fail "the configuration is not mode 644 root/root: $(grep " ./etc/outpost/outpost.toml" <<<"$contents")"
grep -q 'Provides: mail-transport-agent' <<<"$info" || fail "does not provide mail-transport-agent"
grep -q 'Conflicts: mail-transport-agent' <<<"$info" || fail "does not conflict with other MTAs"
grep -q ' postinst' <<<"$info" || fail "no postinst"
grep -q '/etc/outpost/outpost.toml' < <(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles) || fail "configuration is not a conffile"
# The shipped configuration is the production example and is valid.
tmp=$(mktemp -d)
work=""
root=""
daemon=""
cleanup() {
  if [ -n "$daemon" ] && kill -0 "$daemon" 2>/dev/null; then
    kill -TERM "$daemon" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$daemon" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$daemon" 2>/dev/null || true
    wait "$daemon" 2>/dev/null || true
  fi
  if [ -n "$root" ] && mountpoint -q "$root/proc"; then
    umount "$root/proc" || umount -l "$root/proc" || true
  fi
  if [ -n "$root" ] && mountpoint -q "$root/proc"; then
    echo "package test: $root/proc is still mounted; left $work in place" >&2
  elif [ -n "$work" ]; then
    rm -rf --one-file-system "$work"
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
dpkg-deb -x "$deb" "$tmp"
cmp -s "$tmp/etc/outpost/outpost.toml" config/production.example.toml || fail "etc/outpost/outpost.toml differs from the production example"
# (It names /etc/outpost/upstream.secret, which is not there: a warning.)
"$tmp/usr/bin/outpost" check-config --config "$tmp/etc/outpost/outpost.toml" >/dev/null 2>"$tmp/check-config.err" ||
  { cat "$tmp/check-config.err" >&2; fail "shipped configuration does not check"; }
size=$(stat -c %s "$tmp/usr/bin/outpost")
[ "$size" -lt 40000000 ] || fail "binary not stripped ($size bytes)"
echo "package ok: $deb ($(du -h "$deb" | cut -f1)) ($(elapsed))"

# ---------------------------------------------------------------------------
# Installed into a clean Debian root.

[ "$(id -u)" = 0 ] || fail "installing into a Debian root needs root (chroot, mount)"

# The Debian mirror this machine's apt uses: the URI of the first "deb"
# source whose suite is a release name (not -security or -updates).
debian_mirrors() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '$1 == "deb" {
           i = 2
           if ($i ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; i++ }
           if ($(i + 1) ~ /^[a-z]+$/) print $i
         }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk 'BEGIN { RS = ""; FS = "\n" }
         {
           deb = 0; release = 0; uri = ""
           for (i = 1; i <= NF; i++) {
             if ($i ~ /^Types:/ && $i ~ /[ \t]deb([ \t]|$)/) deb = 1
             if ($i ~ /^Enabled:[ \t]*no/) deb = 0
             if ($i ~ /^URIs:/) { n = split($i, u, /[ \t]+/); if (n >= 2) uri = u[2] }
             if ($i ~ /^Suites:/) {
               n = split($i, s, /[ \t]+/)
               for (j = 2; j <= n; j++) if (s[j] ~ /^[a-z]+$/) release = 1
             }
           }
           if (deb && release && uri != "") print uri
         }' "$f"
  done
}

cache=${OUTPOST_TEST_CACHE:-/var/cache/outpost-test}/bookworm-root.tar
work=$(mktemp -d /var/tmp/outpost-package-test.XXXXXX)
root=$work/root
mkdir -m 0755 "$root"
if [ -s "$cache" ]; then
  tar -C "$root" -xf "$cache"
  echo "clean Debian root unpacked from $cache ($(elapsed))"
else
  command -v debootstrap >/dev/null ||
    fail "debootstrap is missing: apt-get install debootstrap (tests/run.sh installs it)"
  mirrors=$(debian_mirrors)
  mirror=${mirrors%%$'\n'*}
  [ -n "$mirror" ] ||
    fail "no Debian mirror in /etc/apt/sources.list or /etc/apt/sources.list.d/ (a \"deb\" line or a .sources stanza for a release such as bookworm)"
  echo "bootstrapping a clean Debian 12 root from $mirror (once; cached in $cache)"
  # adduser: the package's one dependency beyond libc that minbase lacks.
  if ! debootstrap --variant=minbase --include=adduser bookworm "$root" "$mirror" \
      >"$work/debootstrap.log" 2>&1; then
    tail -5 "$work/debootstrap.log" >&2
    fail "debootstrap from $mirror failed (is the mirror reachable from here? the full log is in $work/debootstrap.log)"
  fi
  mkdir -p "$(dirname "$cache")"
  tar -C "$root" -cf "$cache.part" . && mv "$cache.part" "$cache"
  echo "clean Debian root bootstrapped and cached ($(elapsed))"
fi
mount -t proc proc "$root/proc"
# Commands in the root, with a plain environment (no host locale for perl).
in_root() {
  env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LC_ALL=C HOME=/root DEBIAN_FRONTEND=noninteractive chroot "$root" "$@"
}
modes() { in_root stat -c '%a %U %G' "$@"; }

cp "$deb" "$root/tmp/outpost.deb"
out=$(in_root dpkg -i --force-confold /tmp/outpost.deb 2>&1) || { echo "$out" >&2; fail "dpkg -i failed in the clean root"; }
if grep -qi 'warning' <<<"$out"; then
  echo "$out" >&2
  fail "dpkg -i printed a warning"
fi
echo "installed with dpkg -i, no warning ($(elapsed))"
[ "$(modes /etc/outpost/outpost.toml)" = "644 root root" ] ||
  fail "installed configuration is $(modes /etc/outpost/outpost.toml), not 644 root root"
[ "$(modes /etc/outpost)" = "755 root root" ] || fail "/etc/outpost is $(modes /etc/outpost)"
[ "$(modes /var/lib/outpost)" = "700 outpost outpost" ] || fail "/var/lib/outpost is $(modes /var/lib/outpost)"

# A configuration for the test: loopback high ports, an upstream where
# nothing listens, the package's paths otherwise. The upstream password in
# its own file, as docs/OPERATIONS.md says.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
relay_port=$(free_port)
submission_port=$(free_port)
dead_port=$(free_port)
cat >"$root/etc/outpost/outpost.toml" <<EOF
hostname = "outpost.test"
[store]
path = "/var/lib/outpost/queue.sqlite"
min_free = 0
[[listen]]
address = "127.0.0.1:$relay_port"
mode = "relay"
[[listen]]
address = "127.0.0.1:$submission_port"
mode = "submission"
[tls]
self_signed = true
[upstream]
server = "[127.0.0.1]:$dead_port"
tls = "none"
# Loopback only: nothing can listen in between.
allow_plaintext_auth = true
username = "branch7"
password_file = "/etc/outpost/upstream.secret"
[local]
domains = ["branch.example"]
EOF
in_root install -m 0640 -o root -g outpost /dev/null /etc/outpost/upstream.secret
echo "upstream password" >"$root/etc/outpost/upstream.secret"
warnings=$(in_root outpost check-config 2>&1 >/dev/null)
[ -z "$warnings" ] || fail "check-config warns about private files: $warnings"
in_root chmod 0644 /etc/outpost/upstream.secret
in_root outpost check-config 2>&1 >/dev/null | grep -q 'upstream.password_file /etc/outpost/upstream.secret is readable by every user' ||
  fail "check-config does not warn about a world-readable upstream.password_file"
in_root chmod 0640 /etc/outpost/upstream.secret

# An upgrade from a package that kept the configuration 0640 root:outpost
# in a 0750 root:outpost directory. The configuration was changed (the one
# above), so dpkg keeps the file and its modes: postinst opens them up.
in_root chown root:outpost /etc/outpost /etc/outpost/outpost.toml
in_root chmod 0750 /etc/outpost /var/lib/outpost
in_root chmod 0640 /etc/outpost/outpost.toml
out=$(in_root dpkg -i --force-confold /tmp/outpost.deb 2>&1) || { echo "$out" >&2; fail "dpkg -i (again) failed"; }
grep -qi 'warning' <<<"$out" && { echo "$out" >&2; fail "dpkg -i (again) printed a warning"; }
grep -q 'hostname = "outpost.test"' "$root/etc/outpost/outpost.toml" || fail "the upgrade replaced a changed configuration"
[ "$(modes /etc/outpost/outpost.toml)" = "644 root root" ] ||
  fail "after an upgrade the configuration is $(modes /etc/outpost/outpost.toml), not 644 root root"
[ "$(modes /etc/outpost)" = "755 root root" ] || fail "after an upgrade /etc/outpost is $(modes /etc/outpost)"
[ "$(modes /var/lib/outpost)" = "700 outpost outpost" ] || fail "after an upgrade /var/lib/outpost is $(modes /var/lib/outpost)"
echo "upgrade from a 0640 root:outpost configuration: made 0644 root:root ($(elapsed))"

# What systemd does for the unit (RuntimeDirectory=), then the daemon as
# the package's user.
in_root install -d -o outpost -g outpost -m 0755 /run/outpost
uid=$(in_root id -u outpost)
gid=$(in_root id -g outpost)
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C \
  chroot --userspec="$uid:$gid" --groups="$gid" "$root" \
  /usr/bin/outpost serve --config /etc/outpost/outpost.toml >"$work/daemon.log" 2>&1 &
daemon=$!
for _ in $(seq 200); do
  grep -q 'outpost ready' "$work/daemon.log" && [ -S "$root/run/outpost/submit.sock" ] && break
  kill -0 "$daemon" 2>/dev/null || { cat "$work/daemon.log" >&2; fail "outpost serve exited at start"; }
  sleep 0.1
done
grep -q 'outpost ready' "$work/daemon.log" || { cat "$work/daemon.log" >&2; fail "outpost serve was not ready in 20 s"; }
echo "daemon running as outpost, pid $daemon ($(elapsed))"

# As nobody, exactly as a cron job or a web application would.
send_as_nobody() {
  printf 'Subject: %s\n\nhi\n' "$1" |
    in_root su nobody -s /bin/sh -c "/usr/sbin/sendmail $2" >"$work/sendmail.out" 2>&1
}
send_as_nobody "from nobody" someone@example.com ||
  { cat "$work/sendmail.out" >&2; fail "sendmail as nobody failed"; }
[ -s "$work/sendmail.out" ] && { cat "$work/sendmail.out" >&2; fail "sendmail as nobody printed something"; }
queue=$(in_root outpost queue list --json)
grep -q '"someone@example.com"' <<<"$queue" || fail "the message from nobody is not in the queue: $queue"
grep -q '"nobody@outpost.test"' <<<"$queue" || fail "the message's sender is not nobody@outpost.test: $queue"
echo "sendmail as nobody: exit 0, message queued ($(elapsed))"

# A configuration the administrator made private: sendmail falls back to
# the default submission socket, silently.
in_root chmod 0600 /etc/outpost/outpost.toml
send_as_nobody "config unread" other@example.com ||
  { cat "$work/sendmail.out" >&2; fail "sendmail as nobody without the configuration failed"; }
[ -s "$work/sendmail.out" ] && { cat "$work/sendmail.out" >&2; fail "sendmail's fallback printed something"; }
grep -q '"other@example.com"' < <(in_root outpost queue list --json) || fail "the fallback's message is not queued"
echo "sendmail as nobody with the configuration unreadable: queued through the default socket ($(elapsed))"

# The store and the secrets are outpost's: nobody reads none of them.
[ "$(modes /var/lib/outpost/queue.sqlite)" = "600 outpost outpost" ] ||
  fail "the store is $(modes /var/lib/outpost/queue.sqlite)"
[ "$(modes /var/lib/outpost/queue.sqlite-wal)" = "600 outpost outpost" ] ||
  fail "the store's WAL is $(modes /var/lib/outpost/queue.sqlite-wal)"
[ "$(modes /var/lib/outpost/tls/key.pem)" = "600 outpost outpost" ] ||
  fail "the self-signed key is $(modes /var/lib/outpost/tls/key.pem) (or was not made under the state directory)"
for f in /var/lib/outpost/queue.sqlite /var/lib/outpost/queue.sqlite-wal \
    /var/lib/outpost/tls/key.pem /etc/outpost/upstream.secret; do
  if in_root runuser -u nobody -- cat "$f" >/dev/null 2>&1; then
    fail "nobody can read $f"
  fi
done
in_root runuser -u nobody -- ls /var/lib/outpost >/dev/null 2>&1 && fail "nobody can list /var/lib/outpost"
echo "nobody reads neither the store nor a secret ($(elapsed))"

# Stopped, and with no daemon the failure names both causes.
kill -TERM "$daemon"
for _ in $(seq 300); do kill -0 "$daemon" 2>/dev/null || break; sleep 0.1; done
kill -0 "$daemon" 2>/dev/null && fail "outpost did not stop within 30 s of SIGTERM"
wait "$daemon" || true
daemon=""
rc=0
send_as_nobody "no daemon" x@example.com || rc=$?
[ "$rc" = 78 ] || { cat "$work/sendmail.out" >&2; fail "sendmail with neither configuration nor daemon: exit $rc, not 78"; }
grep -q 'Permission denied' "$work/sendmail.out" && grep -q '/run/outpost/submit.sock' "$work/sendmail.out" ||
  { cat "$work/sendmail.out" >&2; fail "sendmail's failure does not name the configuration and the socket"; }
for port in "$relay_port" "$submission_port"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then fail "something still listens on 127.0.0.1:$port"; fi
done
echo "installed package ok: nothing left listening ($(elapsed) in all)"
