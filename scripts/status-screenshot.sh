#!/usr/bin/env bash
# Takes the screenshot of the status page that docs/OPERATIONS.md shows:
# starts a throwaway outpost (temporary directory, loopback ports) with
# some mail queued, some deferred by a small upstream that says
# "greylisted" and the link then down, and takes a 1200x900 picture of
# GET / with headless Chromium. The last 24 hours of samples are made up
# for the picture (a night-long outage), written into the throwaway store.
# Cleans up after itself (the daemon and the upstream by PID).
#
# Usage: scripts/status-screenshot.sh [OUTPUT.png]   (default docs/status-page.png)
# Needs: chromium, python3 (Debian packages).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/status-page.png}
command -v chromium >/dev/null || { echo "chromium is not installed: apt-get install -y chromium" >&2; exit 69; }
command -v python3 >/dev/null || { echo "python3 is not installed: apt-get install -y python3" >&2; exit 69; }

cargo build -q
bin=$PWD/target/debug/outpost
dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
relay=$(free_port); web=$(free_port); up=$(free_port)

# An upstream that defers every recipient, until it is stopped.
python3 - "$up" >"$dir/upstream.log" 2>&1 <<'EOF' &
import socketserver, sys
class H(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(b"220 smtp.hq.example ESMTP\r\n")
        for line in self.rfile:
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.wfile.write(b"250-smtp.hq.example\r\n250 8BITMIME\r\n")
            elif verb == b"RCPT":
                self.wfile.write(b"451 4.7.1 Greylisted, please try again in 5 minutes\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n"); return
            else:
                self.wfile.write(b"250 2.0.0 ok\r\n")
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
EOF
upstream_pid=$!
pids+=("$upstream_pid")

cat >"$dir/outpost.toml" <<EOF
hostname = "outpost.branch.example"
[store]
path = "$dir/queue.sqlite"
[[listen]]
address = "127.0.0.1:$relay"
mode = "relay"
[upstream]
server = "[127.0.0.1]:$up"
tls = "none"
[flush]
interval = "15m"
probe_interval = "0s"
[control]
socket = "$dir/control.sock"
[submit]
socket = "$dir/submit.sock"
[metrics]
address = "127.0.0.1:$web"
EOF
"$bin" serve --config "$dir/outpost.toml" 2>"$dir/log" &
pids+=("$!")
for _ in $(seq 100); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $web), 1)" 2>/dev/null && break
  sleep 0.1
done

send() { # FROM SUBJECT RCPT...
  local from=$1 subject=$2; shift 2
  printf 'From: %s\nSubject: %s\n\nHello.\n' "$from" "$subject" |
    "$bin" sendmail --config "$dir/outpost.toml" -f "$from" "$@"
}
send scanner@branch.example "Scan 0412" accounts@hq.example
send alice@branch.example "Quarterly figures" bob@hq.example carol@partner.example
"$bin" flush --config "$dir/outpost.toml" >/dev/null || true
kill "$upstream_pid"; wait "$upstream_pid" 2>/dev/null || true
send bob@branch.example "Re: delivery on Monday" orders@supplier.example
send printer@branch.example "Toner low" it@hq.example
send alice@branch.example "Minutes" team@hq.example
"$bin" flush --config "$dir/outpost.toml" >/dev/null || true

# Made-up history for the picture: a day with an outage overnight.
python3 - "$dir/queue.sqlite" <<'EOF'
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=10)
now = int(time.time())
rows = []
for m in range(24 * 60, 0, -1):
    at = now - m * 60
    hour = (24 * 60 - m) / 60
    down = 9 <= hour < 15
    queued = int(2 + (hour - 9) * 3) if down else (1 if m % 97 < 4 else 0)
    rows.append((at, queued, 0, 0, "down" if down else "up"))
db.executemany("INSERT OR REPLACE INTO samples VALUES (?, ?, ?, ?, ?)", rows)
db.commit()
EOF

profile=$(mktemp -d -p "$dir")
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --hide-scrollbars --user-data-dir="$profile" \
  --screenshot="$dir/shot.png" --window-size=1200,900 "http://127.0.0.1:$web/" 2>/dev/null
cp "$dir/shot.png" "$out"
echo "wrote $out ($(stat -c %s "$out") octets)"
