#!/usr/bin/env bash
# Apache Kafka, one broker in KRaft mode (broker + controller), from the jars Maven resolved.
# Usage: kafka.sh install | up | down | status
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
NAME=kafka
MARKER="kafka.Kafka $(svc_dir kafka)/server.properties"

install() {
  if [[ -f "$KAFKA_LIBS/.complete" ]]; then return 0; fi
  say "kafka: resolving org.apache.kafka:kafka_2.13:$KAFKA_VERSION and its dependencies from Maven Central"
  rm -rf "$KAFKA_LIBS"
  mvn -q -B -f "$OEL_REPO/infra/local/kafka/pom.xml" dependency:copy-dependencies \
      -Dkafka.version="$KAFKA_VERSION" -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIBS"
  touch "$KAFKA_LIBS/.complete"
}

java_run() { java -Xms128m -Xmx"$KAFKA_HEAP" -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$OEL_REPO/infra/local/kafka/log4j2.properties" -cp "$KAFKA_LIBS/*" "$@"; }

healthy() {
  port_open "$KAFKA_PORT" && grep -q "Kafka Server started" "$(log_file kafka)"
}

up() {
  install
  if running_pid "$NAME" "$MARKER" >/dev/null; then say "kafka: already running"; return 0; fi
  require_free_port kafka "$KAFKA_PORT"
  local dir; dir="$(svc_dir kafka)"; mkdir -p "$dir/data"
  sed -e "s#@PORT@#$KAFKA_PORT#g" -e "s#@CONTROLLER_PORT@#$KAFKA_CONTROLLER_PORT#g" -e "s#@DATA@#$dir/data#g" \
      "$OEL_REPO/infra/local/kafka/server.properties.in" > "$dir/server.properties"
  if [[ ! -f "$dir/data/meta.properties" ]]; then
    local cluster_id; cluster_id="$(java_run kafka.tools.StorageTool random-uuid | tail -n 1)"
    java_run kafka.tools.StorageTool format -t "$cluster_id" -c "$dir/server.properties" --standalone >/dev/null
    say "kafka: formatted storage for cluster $cluster_id"
  fi
  : > "$(log_file kafka)"
  start_bg "$NAME" java -Xms128m -Xmx"$KAFKA_HEAP" -XX:+UseG1GC -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$OEL_REPO/infra/local/kafka/log4j2.properties" -cp "$KAFKA_LIBS/*" \
      kafka.Kafka "$dir/server.properties"
  wait_healthy "$NAME" 90 "$MARKER" healthy
}

status() {
  if pid="$(running_pid "$NAME" "$MARKER")"; then echo "kafka      running  pid $pid  $OEL_BIND:$KAFKA_PORT  (Apache Kafka $KAFKA_VERSION, KRaft)"
  else echo "kafka      stopped"; return 1; fi
}

case "${1:-}" in
  install) install ;;
  up) up ;;
  down) stop_svc "$NAME" "$MARKER" ;;
  status) status ;;
  *) echo "usage: $0 install|up|down|status" >&2; exit 2 ;;
esac
