# Shared by the scripts in bench/ (sourced): logging, Postfix
# tools and private instances, stopping by PID. Needs $PY (python3).

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# find_tool NAME: Postfix's helper programs live in different places.
find_tool() {
    local d
    for d in /usr/sbin /usr/lib/postfix/sbin /usr/libexec/postfix; do
        [ -x "$d/$1" ] && { echo "$d/$1"; return 0; }
    done
    return 1
}

# install_postfix TOOL...: Debian's postfix, preseeded "No configuration"
# (no main.cf, nothing on port 25), when postfix or a tool is missing.
install_postfix() {
    local t missing=
    command -v postfix >/dev/null || missing=1
    for t in "$@"; do find_tool "$t" >/dev/null || missing=1; done
    [ -z "$missing" ] && return 0
    log "installing postfix (preseeded: No configuration)"
    echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postfix >/dev/null; then
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postfix >/dev/null
    fi
}

stop_pid() {  # TERM, up to 10 s, then KILL; only our own PIDs
    local pid=$1
    [ -n "$pid" ] && [ -e "/proc/$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do [ -e "/proc/$pid" ] || break; sleep 0.1; done
    [ -e "/proc/$pid" ] && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
}

# A private Postfix instance in DIR (conf/, spool/): its master's PID, and
# stopping it by that PID, then waiting for it and its children.
master_of() { tr -d ' \n' <"$1/spool/pid/master.pid" 2>/dev/null; }
pf_stop_dir() {
    local m kids p
    m=$(master_of "$1") || return 0
    [ -n "$m" ] && [ -e "/proc/$m" ] || return 0
    kids=$(ps -o pid= --ppid "$m" || true)
    kill -TERM "$m" 2>/dev/null || true
    for p in $m $kids; do
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    done
}
pf_queue_files() { find "$1/spool/maildrop" "$1/spool/incoming" "$1/spool/active" \
                        "$1/spool/deferred" "$1/spool/hold" -type f 2>/dev/null | wc -l; }

write_master_cf() {  # write_master_cf FILE LISTEN_ADDR:PORT (peers.md section 3)
    cat >"$1" <<EOT
$2 inet n - n - - smtpd
pickup    unix n - n 60 1 pickup
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
tlsmgr    unix - - n 1000? 1 tlsmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
flush     unix n - n 1000? 0 flush
proxymap  unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp      unix - - n - - smtp
relay     unix - - n - - smtp
showq     unix n - n - - showq
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
EOT
}

# wait_port PORT: until something listens on 127.0.0.1:PORT (10 s at most).
wait_port() {
    for _ in $(seq 100); do
        ss -ltnH "sport = :$1" | grep -q "127.0.0.1:$1" && return 0
        sleep 0.1
    done
    return 1
}

free_port() { "$PY" -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

port25_check() {  # returns 1 (and says so) when anything listens on port 25
    if [ -n "$(ss -ltnH 'sport = :25')" ]; then
        log "WARNING: something listens on port 25"; return 1
    fi
    log "port 25: nothing listens"
}

# op_config DIR [EXTRA_TOML] -> OP_PORT, OP_CFG: outpost's benchmark
# configuration, a relay listener on a free loopback port, data in DIR.
op_config() {
    local dir=$1
    mkdir -p "$dir"
    OP_PORT=$(free_port)
    OP_CFG=$dir/outpost.toml
    cat >"$OP_CFG" <<EOT
hostname = "outpost.bench.example"

[store]
path = "$dir/queue.sqlite"

[[listen]]
address = "127.0.0.1:$OP_PORT"
mode = "relay"

[relay]
networks = ["127.0.0.0/8"]
max_message_size = 26214400

[smtp]
max_connections = 500
max_connections_per_client = 500

[control]
socket = "$dir/control.sock"

[submit]
socket = "$dir/submit.sock"

[log]
level = "warn"
${2:-}
EOT
}

# pf_queue_only DIR PORT [EXTRA_MAIN_CF]: a private Postfix instance in DIR
# (conf/, spool/) whose smtpd listens on 127.0.0.1:PORT only and which
# queues everything and delivers nothing (defer_transports = smtp);
# peers.md section 3. Started; PF_VERSION set.
pf_queue_only() {
    local dir=$1 port=$2
    mkdir -p "$dir/conf"; mkdir -m 755 "$dir/spool"; chmod 755 "$dir"
    cat >"$dir/conf/main.cf" <<EOT
# Benchmark-only private Postfix instance written by outpost's bench/. Loopback only.
compatibility_level = 3.6
queue_directory = $dir/spool
data_directory = $dir/data
maillog_file_prefixes = /tmp
maillog_file = $dir/maillog
inet_interfaces = loopback-only
inet_protocols = ipv4
myhostname = pf.bench.example
mydomain = bench.example
myorigin = \$myhostname
mydestination =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:9
defer_transports = smtp
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
alias_maps =
alias_database =
local_recipient_maps =
biff = no
append_dot_mydomain = no
${3:-}
EOT
    write_master_cf "$dir/conf/master.cf" "127.0.0.1:$port"
    postfix -c "$dir/conf" start >/dev/null 2>&1 || { tail -5 "$dir/maillog" >&2 || true; die "postfix did not start"; }
    PF_VERSION=$(postconf -c "$dir/conf" -h mail_version)
}
