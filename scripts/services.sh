#!/usr/bin/env bash
# Local backing services for marketflow, without Docker or systemd:
#
#   broker    Apache Kafka (KRaft), jars from Maven Central via mvn, on OpenJDK 17
#   postgres  PostgreSQL 15 + TimescaleDB (Apache-2 edition, built from Debian trixie's source package)
#   redis     Debian's redis-server
#
# Usage: scripts/services.sh {up|down|restart|status} [broker|postgres|redis]
#
# Everything listens on 127.0.0.1 only and keeps its state under $MF_VAR_DIR (default: <repo>/var).
# `up` installs whatever is missing and starts whatever is not running; it is idempotent.
# Ports: MF_BROKER_PORT (19092), MF_CONTROLLER_PORT (broker port + 100), MF_PG_PORT (15432),
# MF_REDIS_PORT (16379). MF_KAFKA_NODES=3: a 3-node Kafka cluster instead of one node (see broker).
# Downloads (Kafka jars, Maven's repository) are cached in $MF_CACHE_DIR (default: <repo>/var/cache).
# On request (off by default): MF_TLS=1 makes a local CA and a server certificate for 127.0.0.1 /
# localhost in $VAR/tls (ca.pem, server.pem, server.key; kept across runs) and turns on TLS in
# PostgreSQL (ssl = on, same port) and Redis (TLS on MF_REDIS_TLS_PORT, default redis port + 1,
# beside the plain port); MF_REDIS_PASSWORD=... sets Redis's requirepass (docs/security.md).
# MF_KAFKA_SASL=1 (single node only) adds two Kafka listeners beside the plaintext one, with the
# same local CA: SASL_SSL on MF_KAFKA_SASL_PORT (broker port + 200; PLAIN, SCRAM-SHA-256 and
# SCRAM-SHA-512) and SSL with required client certificates on MF_KAFKA_SSL_PORT (broker port + 201;
# client.pem / client.key in $VAR/tls). The SASL user is MF_KAFKA_SASL_USER (marketflow), its
# password MF_KAFKA_SASL_PASSWORD or a random one kept in $VAR/kafka/sasl/password; the SCRAM
# credentials are created when the log dir is formatted (docs/security.md#kafka).
# Must run as root (it uses apt-get and runs PostgreSQL as the `postgres` user).
set -Eeuo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
VAR=${MF_VAR_DIR:-$REPO/var}
BROKER_PORT=${MF_BROKER_PORT:-19092}
PG_PORT=${MF_PG_PORT:-15432}
REDIS_PORT=${MF_REDIS_PORT:-16379}

TLS=${MF_TLS:-0}
REDIS_TLS_PORT=${MF_REDIS_TLS_PORT:-$((REDIS_PORT + 1))}
REDIS_PASSWORD=${MF_REDIS_PASSWORD:-}
TLS_DIR=$VAR/tls

CACHE=${MF_CACHE_DIR:-$REPO/var/cache}
CONTROLLER_PORT=${MF_CONTROLLER_PORT:-$((BROKER_PORT + 100))}
KAFKA_VERSION=4.1.1
KAFKA_NODES=${MF_KAFKA_NODES:-1}
KAFKA_HEAP=${MF_KAFKA_HEAP:-1g}
KAFKA_SASL=${MF_KAFKA_SASL:-0}
KAFKA_SASL_PORT=${MF_KAFKA_SASL_PORT:-$((BROKER_PORT + 200))}
KAFKA_SSL_PORT=${MF_KAFKA_SSL_PORT:-$((BROKER_PORT + 201))}
KAFKA_SASL_USER=${MF_KAFKA_SASL_USER:-marketflow}

PG_MAJOR=15
PGBIN=/usr/lib/postgresql/$PG_MAJOR/bin
PG_SHAREDIR=/usr/share/postgresql/$PG_MAJOR   # == $($PGBIN/pg_config --sharedir) on Debian
PGDATA=$VAR/pg/data
PG_SOCK_DIR=$VAR/run/pg
PG_USER=marketflow
PG_PASSWORD=marketflow
PG_DB=marketflow
PG_DSN=postgresql://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB

# apt source entry used only to fetch timescaledb's *source* package from trixie (deb-src only,
# so no trixie binaries can ever be installed from it).
TRIXIE_SRC_LIST=/etc/apt/sources.list.d/marketflow-trixie-src.sources

INSTALL_LOG=$VAR/log/install.log
SERVICES=(broker postgres redis)

export DEBIAN_FRONTEND=noninteractive

# --------------------------------------------------------------------------------------------- helpers

log() { printf '%s\n' "$*"; }
die() { printf 'services.sh: error: %s\n' "$*" >&2; exit 1; }
# Any command failing outside a condition aborts the script (set -e); say where, never fail silently.
trap 'rc=$?; printf "services.sh: error: command failed (exit %s) at line %s: %s\n" "$rc" "$LINENO" "$BASH_COMMAND" >&2' ERR

check_port_var() {
    if ! [[ $2 =~ ^[0-9]+$ ]] || ((10#$2 < 1 || 10#$2 > 65535)); then
        die "$1 must be a TCP port number, got '$2'"
    fi
}

# True if something accepts TCP connections on 127.0.0.1:$1 (bash's /dev/tcp, bounded by timeout).
port_open() {
    # shellcheck disable=SC2016  # $0 is expanded by the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0"' "$1" 2>/dev/null
}

# Best-effort description of whoever listens on port $1 (for error messages only).
port_owner() {
    if command -v ss >/dev/null; then
        ss -ltnpH "sport = :$1" 2>/dev/null | sed -n 's/.*users:((\(.*\)))/\1/p' | head -n1 || true
    fi
}

# Print the last lines of a log file to stderr (used before dying).
show_log_tail() {
    if [[ -f $1 ]]; then
        printf -- '--- last lines of %s ---\n' "$1" >&2
        tail -n "${2:-30}" "$1" >&2 || true
        printf -- '---\n' >&2
    fi
}

# run_logged "description" cmd...: run a noisy command with its output appended to $INSTALL_LOG;
# on failure show the log tail and abort.
run_logged() {
    local what=$1; shift
    mkdir -p "$(dirname "$INSTALL_LOG")"
    printf '\n=== %s: %s\n$ %s\n' "$(date -Is)" "$what" "$*" >>"$INSTALL_LOG"
    if ! "$@" >>"$INSTALL_LOG" 2>&1; then
        show_log_tail "$INSTALL_LOG" 40
        die "$what failed (full log: $INSTALL_LOG)"
    fi
}

# True if the live process $1 has $2 somewhere in its command line (guards against reused pids).
pid_matches() {
    local cmdline
    [[ $1 =~ ^[0-9]+$ ]] && kill -0 "$1" 2>/dev/null || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
    [[ $cmdline == *"$2"* ]]
}

# A process that is alive but not serving is usually in transition (starting, shutting down, just
# killed and not yet reaped): give it up to 5 s to settle. $1 = "serving" check, $2 = "alive" check,
# further arguments are passed to both.
wait_settled() {
    local i serving=$1 alive=$2
    shift 2
    for ((i = 0; i < 50; i++)); do
        if "$serving" "$@" || ! "$alive" "$@"; then return 0; fi
        sleep 0.1
    done
}

read_pidfile() { [[ -s $1 ]] && head -n1 "$1" || true; }

# Wait up to $2 seconds for process $1 to exit.
wait_pid_gone() {
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.1
    done
    return 1
}

# ------------------------------------------------------------------------------------------------ apt

APT_UPDATED=0
apt_update_once() {
    if ((APT_UPDATED == 0)); then
        log "  apt-get update ..."
        run_logged "apt-get update" apt-get update
        APT_UPDATED=1
    fi
}

pkg_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]
}

# Debian packages start their services from their postinst (invoke-rc.d). We run our own instances
# on our own ports, so forbid that while installing, via a temporary policy-rc.d (exit 101 = "not
# allowed"), unless the machine already has one (Docker-style images do).
POLICY_RC=/usr/sbin/policy-rc.d
POLICY_RC_CREATED=0
cleanup() {
    if ((POLICY_RC_CREATED)); then rm -f "$POLICY_RC"; fi
}
trap cleanup EXIT

apt_install() {
    local missing=() p
    for p in "$@"; do
        pkg_installed "$p" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    apt_update_once
    log "  apt-get install ${missing[*]} ..."
    if [[ ! -e $POLICY_RC ]]; then
        printf '#!/bin/sh\n# temporary, from marketflow scripts/services.sh\nexit 101\n' >"$POLICY_RC"
        chmod 755 "$POLICY_RC"
        POLICY_RC_CREATED=1
    fi
    run_logged "apt-get install ${missing[*]}" apt-get install -y --no-install-recommends "${missing[@]}"
    cleanup
    POLICY_RC_CREATED=0
}

# The Debian mirror the machine's own apt sources use (first non-security .../debian URI), so the
# trixie deb-src entry points at the same host. Handles one-line (.list) and deb822 (.sources) files.
detect_debian_mirror() {
    local files=() f mirror
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f $f && $f != "$TRIXIE_SRC_LIST" ]] && files+=("$f")
    done
    mirror=""
    if ((${#files[@]})); then
        mirror=$(awk '
            function consider(u) {
                if (u ~ /^(https?|ftp):\/\// && u ~ /\/debian(\/|$)/ && u !~ /security/) { print u; found = 1; exit }
            }
            /^[[:space:]]*#/ { next }
            /^[[:space:]]*deb(-src)?[[:space:]]/ { for (i = 2; i <= NF; i++) consider($i); next }
            /^URIs:/ { for (i = 2; i <= NF; i++) consider($i) }
        ' "${files[@]}")
    fi
    printf '%s\n' "${mirror:-http://deb.debian.org/debian}"
}

# ------------------------------------------------------------------------------------------------ broker
#
# Apache Kafka in KRaft mode (combined broker + controller per node), its jars resolved from Maven
# Central with mvn (scripts/kafka/pom.xml) into $CACHE/kafka-$KAFKA_VERSION, run on Java 17.
# MF_KAFKA_NODES=3 starts a 3-node cluster instead of the single node: node i (1..N) serves clients
# on MF_BROKER_PORT+i-1 and its controller on MF_CONTROLLER_PORT+i-1, state in $VAR/kafka-cluster;
# with N >= 3 topics default to replication 3 and min.insync.replicas 2. Each node's log dir is
# formatted once; data survives a restart.

KAFKA_LIB=$CACHE/kafka-$KAFKA_VERSION
# A cluster keeps its state apart from the single node's (its own log dirs and cluster id).
KAFKA_TAG=""
[[ $KAFKA_NODES == 1 ]] || KAFKA_TAG="-cluster"
KAFKA_DIR=$VAR/kafka$KAFKA_TAG
KAFKA_LOG4J=$REPO/scripts/kafka/log4j2.xml

kafka_port() { echo $((BROKER_PORT + $1 - 1)); }
kafka_ctl_port() { echo $((CONTROLLER_PORT + $1 - 1)); }
kafka_props() { echo "$KAFKA_DIR/node-$1/server.properties"; }
kafka_pidfile() { echo "$VAR/run/kafka$KAFKA_TAG-$1.pid"; }
kafka_log() { echo "$VAR/log/kafka$KAFKA_TAG-$1.log"; }
KAFKA_SASL_DIR=$KAFKA_DIR/sasl

# MF_KAFKA_SASL=1: the SASL password (given, or made once and kept) and the broker's PKCS#12
# keystore (the local CA's server certificate; its password made once), all mode 600.
ensure_kafka_sasl_secrets() {
    ensure_tls_client_cert
    mkdir -p "$KAFKA_SASL_DIR"
    chmod 700 "$KAFKA_SASL_DIR"
    if [[ -n ${MF_KAFKA_SASL_PASSWORD:-} ]]; then
        (umask 077 && printf '%s\n' "$MF_KAFKA_SASL_PASSWORD" >"$KAFKA_SASL_DIR/password")
    elif [[ ! -s $KAFKA_SASL_DIR/password ]]; then
        (umask 077 && openssl rand -hex 24 >"$KAFKA_SASL_DIR/password")
    fi
    if [[ ! -s $KAFKA_SASL_DIR/keystore.p12 ]]; then
        (umask 077 && openssl rand -hex 24 >"$KAFKA_SASL_DIR/keystore.password")
        run_logged "kafka keystore" openssl pkcs12 -export -in "$TLS_DIR/server.pem" \
            -inkey "$TLS_DIR/server.key" -certfile "$TLS_DIR/ca.pem" -name kafka \
            -out "$KAFKA_SASL_DIR/keystore.p12" -passout "file:$KAFKA_SASL_DIR/keystore.password"
        chmod 600 "$KAFKA_SASL_DIR/keystore.p12"
    fi
}

# Extra server.properties lines of MF_KAFKA_SASL=1 (the PLAIN user's password is in the file,
# which is mode 600; SCRAM users live in the cluster metadata).
kafka_sasl_props() {
    local pw ks_pw
    pw=$(cat "$KAFKA_SASL_DIR/password")
    ks_pw=$(cat "$KAFKA_SASL_DIR/keystore.password")
    cat <<PROPS
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_$KAFKA_SASL_USER="$pw";
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PKCS12
ssl.keystore.location=$KAFKA_SASL_DIR/keystore.p12
ssl.keystore.password=$ks_pw
ssl.truststore.type=PEM
ssl.truststore.location=$TLS_DIR/ca.pem
listener.name.ssl.ssl.client.auth=required
listener.name.sasl_ssl.ssl.client.auth=none
ssl.enabled.protocols=TLSv1.3,TLSv1.2
PROPS
}

# Java >= 17 (Kafka 4 brokers need it) and Maven, from Debian when missing.
ensure_java_maven() {
    local v
    v=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1 || true)
    if [[ -z $v ]] || ((v < 17)); then
        log "broker: installing Java 17 (openjdk-17-jre-headless) ..."
        apt_install openjdk-17-jre-headless
    fi
    if ! command -v mvn >/dev/null; then
        log "broker: installing Maven ..."
        apt_install maven
    fi
    # Debian's librdkafka CLI: the standard client the tests read the bars topic with.
    command -v kcat >/dev/null || apt_install kcat
}

# The broker's jars, resolved once per pinned version (a marker file says the copy completed).
ensure_kafka_jars() {
    ensure_java_maven
    [[ -f $KAFKA_LIB/.complete ]] && return 0
    log "broker: resolving Apache Kafka $KAFKA_VERSION jars from Maven Central (mvn) into $KAFKA_LIB ..."
    rm -rf "$KAFKA_LIB"
    mkdir -p "$KAFKA_LIB" "$CACHE/m2"
    run_logged "mvn dependency:copy-dependencies (kafka $KAFKA_VERSION)" \
        mvn -B -q -f "$REPO/scripts/kafka/pom.xml" -Dmaven.repo.local="$CACHE/m2" \
        -Dkafka.version="$KAFKA_VERSION" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIB"
    [[ -f $KAFKA_LIB/kafka_2.13-$KAFKA_VERSION.jar ]] || die "broker: kafka_2.13-$KAFKA_VERSION.jar missing in $KAFKA_LIB"
    touch "$KAFKA_LIB/.complete"
    log "broker: $(find "$KAFKA_LIB" -name '*.jar' | wc -l) jars ($(du -sh "$KAFKA_LIB" | cut -f1))"
}

kafka_java() { java -cp "$KAFKA_LIB/*" "$@"; }

# server.properties of node $1, rewritten on every start (edit this script, not the file).
write_kafka_props() {
    local i=$1 n=$KAFKA_NODES voters="" j rf=1 isr=1
    for ((j = 1; j <= n; j++)); do
        voters+="${voters:+,}$j@127.0.0.1:$(kafka_ctl_port "$j")"
    done
    if ((n >= 3)); then rf=3; isr=2; fi
    local extra="" map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
    if [[ $KAFKA_SASL == 1 ]]; then
        extra=",SASL_SSL://127.0.0.1:$KAFKA_SASL_PORT,SSL://127.0.0.1:$KAFKA_SSL_PORT"
        map+=",SASL_SSL:SASL_SSL,SSL:SSL"
    fi
    mkdir -p "$KAFKA_DIR/node-$i"
    (umask 077 && : >"$(kafka_props "$i")") && chmod 600 "$(kafka_props "$i")"
    cat >"$(kafka_props "$i")" <<PROPS
# Managed by scripts/services.sh, rewritten on every start.
process.roles=broker,controller
node.id=$i
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:$(kafka_port "$i"),CONTROLLER://127.0.0.1:$(kafka_ctl_port "$i")$extra
advertised.listeners=PLAINTEXT://127.0.0.1:$(kafka_port "$i")$extra
listener.security.protocol.map=$map
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$KAFKA_DIR/node-$i/data
num.partitions=1
default.replication.factor=$rf
min.insync.replicas=$isr
offsets.topic.replication.factor=$rf
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
delete.topic.enable=true
log.retention.hours=168
PROPS
    [[ $KAFKA_SASL == 1 ]] && kafka_sasl_props >>"$(kafka_props "$i")"
    return 0
}

# Format node $1's log dir once (KRaft metadata with the cluster id of $KAFKA_DIR/cluster.id).
ensure_kafka_formatted() {
    local i=$1 id pw
    local -a scram=()
    if [[ -f $KAFKA_DIR/node-$i/data/meta.properties ]]; then
        if [[ $KAFKA_SASL == 1 && ! -f $KAFKA_SASL_DIR/formatted ]]; then
            die "broker: MF_KAFKA_SASL=1, but $KAFKA_DIR was formatted without SCRAM users (they are" \
                "made at format time); remove $KAFKA_DIR (its topics go) or use another MF_VAR_DIR"
        fi
        return 0
    fi
    mkdir -p "$KAFKA_DIR"
    if [[ ! -s $KAFKA_DIR/cluster.id ]]; then
        kafka_java kafka.tools.StorageTool random-uuid >"$KAFKA_DIR/cluster.id" 2>>"$INSTALL_LOG" ||
            die "broker: kafka-storage random-uuid failed (log: $INSTALL_LOG)"
    fi
    id=$(cat "$KAFKA_DIR/cluster.id")
    if [[ $KAFKA_SASL == 1 ]]; then
        # StorageTool takes the credentials only as arguments: visible in ps for this one run
        pw=$(cat "$KAFKA_SASL_DIR/password")
        scram=(--add-scram "SCRAM-SHA-256=[name=$KAFKA_SASL_USER,password=$pw]"
            --add-scram "SCRAM-SHA-512=[name=$KAFKA_SASL_USER,password=$pw]")
    fi
    log "broker: formatting the log dir of node $i ($KAFKA_DIR/node-$i/data, cluster $id)"
    run_logged "kafka-storage format node $i" kafka_java kafka.tools.StorageTool format \
        -t "$id" -c "$(kafka_props "$i")" --ignore-formatted "${scram[@]}"
    if [[ $KAFKA_SASL == 1 ]]; then
        touch "$KAFKA_SASL_DIR/formatted"
        log "broker: SCRAM-SHA-256/512 user '$KAFKA_SASL_USER' created (password: $KAFKA_SASL_DIR/password)"
    fi
}

kafka_node_pid() {
    local pid
    pid=$(read_pidfile "$(kafka_pidfile "$1")")
    pid_matches "$pid" "$(kafka_props "$1")" && printf '%s\n' "$pid"
}
kafka_node_alive() { kafka_node_pid "$1" >/dev/null; }
kafka_node_running() { kafka_node_alive "$1" && port_open "$(kafka_port "$1")"; }

broker_running() {
    local i
    for ((i = 1; i <= KAFKA_NODES; i++)); do kafka_node_running "$i" || return 1; done
}

# Start node $1 in the background (no waiting); prints its pid.
start_kafka_node() {
    local i=$1 pid
    [[ $KAFKA_SASL == 1 ]] && ensure_kafka_sasl_secrets
    write_kafka_props "$i"
    ensure_kafka_formatted "$i"
    printf '\n=== %s: starting Apache Kafka %s node %s on 127.0.0.1:%s\n' "$(date -Is)" \
        "$KAFKA_VERSION" "$i" "$(kafka_port "$i")" >>"$(kafka_log "$i")"
    # setsid: own session, so it survives this shell and terminal hangups; $! is java's pid.
    setsid nohup java -Xms256m "-Xmx$KAFKA_HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$KAFKA_LOG4J" -Dmf.kafka.log="$(kafka_log "$i")" \
        -cp "$KAFKA_LIB/*" kafka.Kafka "$(kafka_props "$i")" \
        </dev/null >>"$(kafka_log "$i")" 2>&1 &
    pid=$!
    echo "$pid" >"$(kafka_pidfile "$i")"
}

# Wait until node $1 logged "Kafka Server started" after byte offset $2 of its log (~60 s).
wait_kafka_node() {
    local i=$1 from=$2 pid lf j
    pid=$(read_pidfile "$(kafka_pidfile "$i")")
    lf=$(kafka_log "$i")
    for ((j = 0; j < 600; j++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            show_log_tail "$lf"
            rm -f "$(kafka_pidfile "$i")"
            die "broker: Kafka node $i exited during startup (log: $lf)"
        fi
        if tail -c +"$((from + 1))" "$lf" | grep -q 'Kafka Server started' && port_open "$(kafka_port "$i")"; then
            return 0
        fi
        sleep 0.1
    done
    show_log_tail "$lf"
    kill "$pid" 2>/dev/null || true
    rm -f "$(kafka_pidfile "$i")"
    die "broker: Kafka node $i not started after 60 s (log: $lf)"
}

broker_up() {
    local i to_start=() offsets=() lf port
    for ((i = 1; i <= KAFKA_NODES; i++)); do
        wait_settled kafka_node_running kafka_node_alive "$i"
        port=$(kafka_port "$i")
        if kafka_node_running "$i"; then
            log "broker: Kafka node $i already running on 127.0.0.1:$port (pid $(kafka_node_pid "$i"))"
            continue
        fi
        if kafka_node_alive "$i"; then
            die "broker: Kafka node $i (pid $(kafka_node_pid "$i")) is alive but 127.0.0.1:$port does not" \
                "accept connections (try: scripts/services.sh restart broker); log: $(kafka_log "$i")"
        fi
        if port_open "$port"; then
            die "broker: port 127.0.0.1:$port is already in use by another process ($(port_owner "$port"))"
        fi
        port=$(kafka_ctl_port "$i")
        if port_open "$port"; then
            die "broker: controller port 127.0.0.1:$port is already in use by another process ($(port_owner "$port"))"
        fi
        to_start+=("$i")
    done
    ((${#to_start[@]})) || return 0
    ensure_kafka_jars
    mkdir -p "$VAR/run" "$VAR/log"
    # Start every missing node before waiting: a node of a cluster finishes starting only once a
    # quorum of controllers answers.
    for i in "${to_start[@]}"; do
        lf=$(kafka_log "$i")
        touch "$lf"
        offsets+=("$(stat -c %s "$lf")")
        start_kafka_node "$i"
    done
    for ((i = 0; i < ${#to_start[@]}; i++)); do
        wait_kafka_node "${to_start[$i]}" "${offsets[$i]}"
        log "broker: started Apache Kafka $KAFKA_VERSION node ${to_start[$i]} on" \
            "127.0.0.1:$(kafka_port "${to_start[$i]}") (pid $(kafka_node_pid "${to_start[$i]}"), KRaft, data $KAFKA_DIR/node-${to_start[$i]}/data)"
    done
    if [[ $KAFKA_SASL == 1 ]]; then
        log "broker: SASL_SSL on 127.0.0.1:$KAFKA_SASL_PORT, SSL (client certificates required) on" \
            "127.0.0.1:$KAFKA_SSL_PORT, CA $TLS_DIR/ca.pem"
    fi
}

broker_down() {
    local i pid
    for ((i = KAFKA_NODES; i >= 1; i--)); do
        if ! pid=$(kafka_node_pid "$i"); then
            rm -f "$(kafka_pidfile "$i")"
            log "broker: Kafka node $i not running"
            continue
        fi
        # SIGTERM: controlled shutdown (leaders moved, logs flushed and closed cleanly).
        kill -TERM "$pid" 2>/dev/null || true
        if ! wait_pid_gone "$pid" 60; then
            log "broker: Kafka node $i (pid $pid) ignored SIGTERM for 60 s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            wait_pid_gone "$pid" 5 || die "broker: could not stop pid $pid"
        fi
        rm -f "$(kafka_pidfile "$i")"
        log "broker: Kafka node $i stopped"
    done
}

broker_status() {
    local i rc=0
    for ((i = 1; i <= KAFKA_NODES; i++)); do
        if kafka_node_running "$i"; then
            log "broker: Kafka node $i up (127.0.0.1:$(kafka_port "$i"), pid $(kafka_node_pid "$i"))"
        else
            log "broker: Kafka node $i down"
            rc=1
        fi
    done
    return "$rc"
}

# ---------------------------------------------------------------------------------------------- postgres

PG_LOG=$VAR/log/postgres.log

as_postgres() { (cd / && runuser -u postgres -- "$@"); }

# Superuser access over the unix socket (local connections are trusted in our pg_hba.conf).
psql_admin() {
    "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_SOCK_DIR" -p "$PG_PORT" -U postgres "$@"
}

# Build TimescaleDB (Apache-2 edition) from Debian trixie's source package against bookworm's
# PostgreSQL 15 (bookworm itself has no timescaledb package; see docs/operations.md).
timescaledb_installed() { [[ -f $PG_SHAREDIR/extension/timescaledb.control ]]; }

# Write the trixie deb-src entry (same mirror as the machine's bookworm sources). main() calls this
# before anything runs apt-get update, so that a single update covers everything.
ensure_trixie_src_entry() {
    local mirror src_entry
    mirror=$(detect_debian_mirror)
    src_entry="# marketflow scripts/services.sh: source packages only (deb-src), to build timescaledb.
Types: deb-src
URIs: $mirror
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"
    if [[ ! -f $TRIXIE_SRC_LIST || $(cat "$TRIXIE_SRC_LIST") != "$src_entry" ]]; then
        printf '%s\n' "$src_entry" >"$TRIXIE_SRC_LIST"
        APT_UPDATED=0 # a new entry needs an index refresh
    fi
}

build_timescaledb() {
    local builddir srcdir
    ensure_trixie_src_entry
    apt_install "postgresql-$PG_MAJOR" "postgresql-server-dev-$PG_MAJOR" cmake make gcc libc6-dev \
        libssl-dev dpkg-dev xz-utils debian-archive-keyring
    apt_update_once # apt-get source needs the trixie Sources index, even if nothing was installed

    builddir=$VAR/build/timescaledb
    rm -rf "$builddir"
    mkdir -p "$builddir"
    log "  fetching timescaledb source package from trixie ($(detect_debian_mirror)) ..."
    (cd "$builddir" && run_logged "apt-get source timescaledb/trixie" apt-get source timescaledb/trixie)
    srcdir=$(find "$builddir" -mindepth 1 -maxdepth 1 -type d -name 'timescaledb-*' | head -n1)
    [[ -n $srcdir && -f $srcdir/CMakeLists.txt ]] || die "postgres: unpacked timescaledb source not found in $builddir"
    log "  building $(basename "$srcdir") (APACHE_ONLY) ..."
    run_logged "cmake timescaledb" cmake -S "$srcdir" -B "$srcdir/build" \
        -DCMAKE_BUILD_TYPE=Release \
        -DPG_CONFIG="$PGBIN/pg_config" \
        -DAPACHE_ONLY=1 \
        -DSEND_TELEMETRY_DEFAULT=OFF -DUSE_TELEMETRY=OFF \
        -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF \
        -DWARNINGS_AS_ERRORS=OFF
    run_logged "make timescaledb" make -C "$srcdir/build" -j"$(nproc)"
    run_logged "make install timescaledb" make -C "$srcdir/build" install
    timescaledb_installed ||
        die "postgres: timescaledb built but $PG_SHAREDIR/extension/timescaledb.control is missing"
}

ensure_postgres_installed() {
    if [[ ! -x $PGBIN/postgres || ! -x $PGBIN/psql ]]; then
        apt_install "postgresql-$PG_MAJOR" "postgresql-client-$PG_MAJOR"
    fi
    if ! timescaledb_installed; then
        log "postgres: TimescaleDB not installed for PostgreSQL $PG_MAJOR, building it from source (log: $INSTALL_LOG)"
        build_timescaledb
    fi
    id postgres >/dev/null 2>&1 || die "postgres: system user 'postgres' does not exist (postgresql-common not installed?)"
}

# initdb refuses to run as root, so the cluster belongs to `postgres`, who must be able to reach it.
# Walks from / down to $1 and adds o+x where postgres could not pass.
ensure_traversable_for_postgres() {
    local path=$1 d="" part
    local -a parts
    IFS=/ read -r -a parts <<<"${path#/}"
    for part in "${parts[@]}"; do
        [[ -n $part ]] || continue
        d=$d/$part
        if ! as_postgres test -x "$d"; then
            log "  chmod o+x $d (so the postgres user can reach $path)"
            chmod o+x "$d"
        fi
    done
}

ensure_cluster() {
    mkdir -p "$VAR/pg" "$VAR/run" "$VAR/log"
    ensure_traversable_for_postgres "$VAR"
    chown postgres:postgres "$VAR/pg"
    chmod 700 "$VAR/pg"
    if [[ ! -f $PGDATA/PG_VERSION ]]; then
        if [[ -d $PGDATA ]] && [[ -n $(ls -A "$PGDATA") ]]; then
            log "  $PGDATA has no PG_VERSION (interrupted initdb?), removing it"
            rm -rf "$PGDATA"
        fi
        log "  initdb $PGDATA ..."
        # Dev-only cluster: unix-socket connections are trusted (the socket lives in our var dir),
        # TCP connections need a password.
        run_logged "initdb" as_postgres "$PGBIN/initdb" -D "$PGDATA" -U postgres \
            --encoding=UTF8 --locale=C.UTF-8 \
            --auth-local=trust --auth-host=scram-sha-256
        # Our settings live in marketflow.conf, rewritten on every start (see postgres_up).
        printf "\n# marketflow: settings managed by scripts/services.sh\ninclude_if_exists = 'marketflow.conf'\n" \
            >>"$PGDATA/postgresql.conf"
    fi
    [[ $(cat "$PGDATA/PG_VERSION") == "$PG_MAJOR" ]] ||
        die "postgres: $PGDATA is a PostgreSQL $(cat "$PGDATA/PG_VERSION") cluster, expected $PG_MAJOR"
}

write_pg_conf() {
    cat >"$PGDATA/marketflow.conf" <<EOF
# Managed by scripts/services.sh, rewritten on every start: edit the script, not this file.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_SOCK_DIR'
shared_preload_libraries = 'timescaledb'
timescaledb.telemetry_level = off
EOF
    if [[ $TLS == 1 ]]; then
        ensure_tls_certs
        # PostgreSQL wants its key owned by the server user and not readable by others
        install -o postgres -g postgres -m 600 "$TLS_DIR/server.key" "$PGDATA/server.key"
        install -o postgres -g postgres -m 644 "$TLS_DIR/server.pem" "$PGDATA/server.crt"
        printf "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_min_protocol_version = 'TLSv1.2'\n" \
            >>"$PGDATA/marketflow.conf"
    fi
    chown postgres:postgres "$PGDATA/marketflow.conf"
}

# pg_ctl status: 0 = running, 3 = not running, 4 = no (accessible) data directory.
postgres_proc_running() {
    [[ -f $PGDATA/PG_VERSION ]] && id postgres >/dev/null 2>&1 &&
        as_postgres "$PGBIN/pg_ctl" status -D "$PGDATA" >/dev/null 2>&1
}

postgres_running() { postgres_proc_running && port_open "$PG_PORT"; }

# Role, database and extension; each created only if missing.
ensure_pg_objects() {
    if [[ -z $(psql_admin -d postgres -tAc "select 1 from pg_roles where rolname = '$PG_USER'") ]]; then
        # SUPERUSER: dev-only local cluster; tests create databases and the timescaledb extension.
        psql_admin -d postgres -c "create role $PG_USER login superuser password '$PG_PASSWORD'"
        log "  created role $PG_USER"
    fi
    if [[ -z $(psql_admin -d postgres -tAc "select 1 from pg_database where datname = '$PG_DB'") ]]; then
        psql_admin -d postgres -c "create database $PG_DB owner $PG_USER"
        log "  created database $PG_DB"
    fi
    if [[ -z $(psql_admin -d "$PG_DB" -tAc "select 1 from pg_extension where extname = 'timescaledb'") ]]; then
        psql_admin -d "$PG_DB" -c "create extension if not exists timescaledb"
        log "  created extension timescaledb in $PG_DB"
    fi
}

# Verify over TCP with the application's credentials; print the timescaledb version.
pg_timescaledb_version() {
    local v
    v=$(PGCONNECT_TIMEOUT=5 "$PGBIN/psql" -X -tA "$PG_DSN" \
        -c "select extversion from pg_extension where extname = 'timescaledb'" 2>&1) ||
        die "postgres: cannot query $PG_DSN: $v"
    [[ -n $v ]] || die "postgres: timescaledb extension missing in database $PG_DB"
    printf '%s\n' "$v"
}

postgres_up() {
    local v
    wait_settled postgres_running postgres_proc_running
    if postgres_running; then
        ensure_pg_objects
        v=$(pg_timescaledb_version)
        log "postgres: already running on 127.0.0.1:$PG_PORT (timescaledb $v)"
        return 0
    fi
    if postgres_proc_running; then
        die "postgres: the cluster in $PGDATA is running but 127.0.0.1:$PG_PORT does not accept connections" \
            "(started on another port? try: scripts/services.sh restart postgres)"
    fi
    if port_open "$PG_PORT"; then
        die "postgres: port 127.0.0.1:$PG_PORT is already in use by another process ($(port_owner "$PG_PORT"))"
    fi
    ensure_postgres_installed
    ensure_cluster
    write_pg_conf
    mkdir -p "$PG_SOCK_DIR"
    chown postgres:postgres "$PG_SOCK_DIR"
    chmod 755 "$PG_SOCK_DIR"
    touch "$PG_LOG"
    chown postgres:postgres "$PG_LOG"
    if ! as_postgres "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PG_LOG" -w -t 60 start >>"$INSTALL_LOG" 2>&1; then
        show_log_tail "$PG_LOG"
        die "postgres: pg_ctl start failed (log: $PG_LOG)"
    fi
    port_open "$PG_PORT" || die "postgres: started but 127.0.0.1:$PG_PORT does not accept connections (log: $PG_LOG)"
    ensure_pg_objects
    v=$(pg_timescaledb_version)
    log "postgres: started on 127.0.0.1:$PG_PORT (timescaledb $v; $PG_DSN)"
}

postgres_down() {
    if ! postgres_proc_running; then
        log "postgres: not running"
        return 0
    fi
    if ! as_postgres "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -t 60 stop >>"$INSTALL_LOG" 2>&1; then
        show_log_tail "$PG_LOG"
        die "postgres: pg_ctl stop failed (log: $PG_LOG)"
    fi
    log "postgres: stopped"
}

postgres_status() {
    if postgres_running; then
        log "postgres: up (127.0.0.1:$PG_PORT, data $PGDATA)"
    else
        log "postgres: down"
        return 1
    fi
}

# --------------------------------------------------------------------------------------------------- tls

# A local CA and a server certificate for 127.0.0.1 / localhost (MF_TLS=1), made once in $TLS_DIR.
ensure_tls_certs() {
    [[ -f $TLS_DIR/ca.pem && -f $TLS_DIR/server.pem && -f $TLS_DIR/server.key ]] && return 0
    command -v openssl >/dev/null || apt_install openssl
    mkdir -p "$TLS_DIR"
    chmod 700 "$TLS_DIR"
    log "tls: making a local CA and a server certificate in $TLS_DIR"
    run_logged "tls ca" openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.pem" -days 3650 -subj "/CN=marketflow local CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    sign_tls_cert server /CN=127.0.0.1 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth'
}

# $TLS_DIR/$1.key and $1.pem: a P-256 key and its certificate, subject $2, extensions $3
# (printf format), signed by the local CA.
sign_tls_cert() {
    local name=$1 subject=$2 ext=$3
    run_logged "tls $name csr" openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$TLS_DIR/$name.key" -out "$TLS_DIR/$name.csr" -subj "$subject"
    # shellcheck disable=SC2059  # $ext is the format, by design
    printf "$ext\n" >"$TLS_DIR/$name.ext"
    run_logged "tls $name cert" openssl x509 -req -in "$TLS_DIR/$name.csr" -CA "$TLS_DIR/ca.pem" \
        -CAkey "$TLS_DIR/ca.key" -CAcreateserial -out "$TLS_DIR/$name.pem" -days 825 \
        -extfile "$TLS_DIR/$name.ext"
    rm -f "$TLS_DIR/$name.csr" "$TLS_DIR/$name.ext"
}

# A client certificate (CN=marketflow) of the local CA, for Kafka's SSL listener (MF_KAFKA_SASL=1).
ensure_tls_client_cert() {
    ensure_tls_certs
    [[ -f $TLS_DIR/client.pem && -f $TLS_DIR/client.key ]] && return 0
    log "tls: making a client certificate in $TLS_DIR"
    sign_tls_cert client /CN=marketflow 'extendedKeyUsage=clientAuth'
}

# ------------------------------------------------------------------------------------------------- redis

REDIS_PIDFILE=$VAR/run/redis.pid
REDIS_LOG=$VAR/log/redis.log

redis_cli() { REDISCLI_AUTH=$REDIS_PASSWORD redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }

redis_pid() {
    local pid
    pid=$(read_pidfile "$REDIS_PIDFILE")
    pid_matches "$pid" redis-server && printf '%s\n' "$pid"
}

redis_alive() { redis_pid >/dev/null; }
redis_running() {
    redis_alive && command -v redis-cli >/dev/null &&
        [[ $(redis_cli ping 2>/dev/null) == PONG ]]
}

redis_up() {
    wait_settled redis_running redis_alive
    if redis_running; then
        log "redis: already running on 127.0.0.1:$REDIS_PORT (pid $(redis_pid))"
        return 0
    fi
    if redis_alive; then
        die "redis: process $(redis_pid) is alive but does not answer PING on 127.0.0.1:$REDIS_PORT" \
            "(started on another port? try: scripts/services.sh restart redis)"
    fi
    if port_open "$REDIS_PORT"; then
        die "redis: port 127.0.0.1:$REDIS_PORT is already in use by another process ($(port_owner "$REDIS_PORT"))"
    fi
    if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
        log "redis: installing redis-server (log: $INSTALL_LOG)"
        apt_install redis-server redis-tools
    fi
    mkdir -p "$VAR/run" "$VAR/log" "$VAR/redis"
    rm -f "$REDIS_PIDFILE"
    local -a extra=()
    if [[ $TLS == 1 ]]; then
        ensure_tls_certs
        extra+=(--tls-port "$REDIS_TLS_PORT" --tls-cert-file "$TLS_DIR/server.pem"
            --tls-key-file "$TLS_DIR/server.key" --tls-ca-cert-file "$TLS_DIR/ca.pem"
            --tls-auth-clients no)
    fi
    # The password goes in as a config file on stdin ("-"), never on the command line (ps).
    # No persistence (--save "" --appendonly no): it is a cache.
    local conf=""
    [[ -n $REDIS_PASSWORD ]] && conf="requirepass \"$REDIS_PASSWORD\""
    if ! printf '%s\n' "$conf" |
        redis-server - --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" \
        --save "" --appendonly no "${extra[@]}" \
        --pidfile "$REDIS_PIDFILE" --logfile "$REDIS_LOG" --dir "$VAR/redis" >>"$INSTALL_LOG" 2>&1; then
        show_log_tail "$REDIS_LOG"
        die "redis: redis-server failed to start (log: $REDIS_LOG)"
    fi
    local i
    for ((i = 0; i < 100; i++)); do # ~10 s
        redis_running && break
        sleep 0.1
    done
    if ! redis_running; then
        show_log_tail "$REDIS_LOG"
        die "redis: not answering PING on 127.0.0.1:$REDIS_PORT after 10 s (log: $REDIS_LOG)"
    fi
    local tls_note=""
    [[ $TLS == 1 ]] && tls_note="; TLS on 127.0.0.1:$REDIS_TLS_PORT, CA $TLS_DIR/ca.pem"
    log "redis: started on 127.0.0.1:$REDIS_PORT (pid $(redis_pid)$tls_note)"
}

redis_down() {
    local pid
    if ! pid=$(redis_pid); then
        rm -f "$REDIS_PIDFILE"
        log "redis: not running"
        return 0
    fi
    redis_cli shutdown nosave >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
    if ! wait_pid_gone "$pid" 10; then
        log "redis: pid $pid still alive after 10 s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_pid_gone "$pid" 5 || die "redis: could not stop pid $pid"
    fi
    rm -f "$REDIS_PIDFILE"
    log "redis: stopped"
}

redis_status() {
    if redis_running; then
        log "redis: up (127.0.0.1:$REDIS_PORT, pid $(redis_pid))"
    else
        log "redis: down"
        return 1
    fi
}

# -------------------------------------------------------------------------------------------------- main

usage() {
    cat >&2 <<EOF
usage: scripts/services.sh {up|down|restart|status} [broker|postgres|redis]

  up       install what is missing and start what is not running (idempotent)
  down     stop (idempotent)
  restart  down + up (data is kept)
  status   print up/down per service; exit 0 only if all selected services are up

ports: broker 127.0.0.1:$BROKER_PORT (MF_BROKER_PORT; MF_KAFKA_NODES=$KAFKA_NODES node(s), controllers from
       127.0.0.1:$CONTROLLER_PORT, MF_CONTROLLER_PORT), postgres 127.0.0.1:$PG_PORT (MF_PG_PORT),
       redis 127.0.0.1:$REDIS_PORT (MF_REDIS_PORT); state in $VAR (MF_VAR_DIR)
postgres DSN: $PG_DSN
EOF
    exit 2
}

main() {
    (($# >= 1 && $# <= 2)) || usage
    local cmd=$1 svc
    local selected=("${SERVICES[@]}")
    if (($# == 2)); then
        case $2 in
            broker | postgres | redis) selected=("$2") ;;
            *) usage ;;
        esac
    fi
    check_port_var MF_BROKER_PORT "$BROKER_PORT"
    check_port_var MF_CONTROLLER_PORT "$CONTROLLER_PORT"
    [[ $KAFKA_NODES =~ ^[1-9]$ ]] || die "MF_KAFKA_NODES must be 1..9, got '$KAFKA_NODES'"
    if [[ $KAFKA_SASL == 1 ]]; then
        [[ $KAFKA_NODES == 1 ]] || die "MF_KAFKA_SASL=1 needs MF_KAFKA_NODES=1"
        check_port_var MF_KAFKA_SASL_PORT "$KAFKA_SASL_PORT"
        check_port_var MF_KAFKA_SSL_PORT "$KAFKA_SSL_PORT"
    fi
    check_port_var MF_PG_PORT "$PG_PORT"
    check_port_var MF_REDIS_PORT "$REDIS_PORT"

    # Services in reverse order, for stopping.
    local reversed=()
    for svc in "${selected[@]}"; do reversed=("$svc" "${reversed[@]}"); done

    case $cmd in
        up | down | restart)
            [[ $(id -u) == 0 ]] || die "must run as root (apt-get, and PostgreSQL runs as user postgres)"
            ;;
    esac
    # Only one `apt-get update` per run: if TimescaleDB will have to be built, add its deb-src
    # entry before anything else may update the indexes.
    case $cmd in
        up | restart)
            if [[ " ${selected[*]} " == *" postgres "* ]] && ! timescaledb_installed; then
                ensure_trixie_src_entry
            fi
            ;;
    esac
    case $cmd in
        up)
            for svc in "${selected[@]}"; do "${svc}_up"; done
            ;;
        down)
            for svc in "${reversed[@]}"; do "${svc}_down"; done
            ;;
        restart)
            for svc in "${reversed[@]}"; do "${svc}_down"; done
            for svc in "${selected[@]}"; do "${svc}_up"; done
            ;;
        status)
            local rc=0
            for svc in "${selected[@]}"; do "${svc}_status" || rc=1; done
            exit "$rc"
            ;;
        *) usage ;;
    esac
}

main "$@"
