# shellcheck shell=bash
# Sourced by scripts/bench and scripts/profile: the pieces of the benchmark's
# system both set up the same way.

# Whether nothing listens on the loopback port $1.
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Waits up to 30 s for url $1 to answer 2xx, else names $2 and exits (logs in $RUN).
wait_ready() {
  for _ in $(seq 1 600); do
    curl -fs -o /dev/null "$1" && return 0
    sleep 0.05
  done
  echo "$2 did not become ready; logs in $RUN" >&2
  exit 1
}

# Starts postback-service on data dir $1 at $POSTBACK_ADDR, in $RUN, logging to
# $RUN/postback-service.log; POSTBACK_ENV (VAR=value words) and POSTBACK_WRAP (a
# command prefix) are optional. Sets POSTBACK_PID and adds it to pids.
start_postback() {
  # shellcheck disable=SC2086 # the wrapper and extra env are words on purpose
  (cd "$RUN" && exec env LISTEN_ADDR="$POSTBACK_ADDR" DATA_DIR="$1" \
    POSTBACK_ALLOW_PRIVATE=true UNKNOWN_CLICK_GRACE_MS=5000 ${POSTBACK_ENV:-} \
    ${POSTBACK_WRAP:-} "$BIN/postback-service") >>"$RUN/postback-service.log" 2>&1 &
  POSTBACK_PID=$!
  pids+=("$POSTBACK_PID")
}

# PUT json $2 to click-service's admin API path $1 (at $CLICK_ADDR, as $ADMIN_TOKEN).
admin() {
  curl -fsS -o /dev/null -X PUT "http://$CLICK_ADDR$1" -H "Authorization: Bearer $ADMIN_TOKEN" \
    -H 'content-type: application/json' -d "$2"
}

# The offer `bench`, the affiliate `bench-aff` (no postback URL) and `bench-pb`,
# whose postback URL is a receiver on loopback port $1.
bench_catalog() {
  admin /api/offers/bench '{"name":"Bench","url":"https://shop.example/land?cid={click_id}&s1={sub1}&src={source}","payout":"2.50","revenue":"10.00","currency":"USD","attribution_window_hours":720}'
  admin /api/affiliates/bench-aff '{"name":"Bench affiliate"}'
  admin /api/affiliates/bench-pb "{\"name\":\"Bench postbacks\",\"postback_url\":\"http://127.0.0.1:$1/pb?delivery_id={delivery_id}&click_id={click_id}&payout={payout}&tx={txid}\"}"
}
