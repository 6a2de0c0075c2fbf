#!/bin/sh
# Forms a Redis Cluster of masters only from the nodes named in REDIS_NODES (service
# names, port REDIS_PORT), then waits until every node reports `cluster_state:ok`.
# Safe to run again: a cluster that already exists is left as it is.
set -eu

nodes=${REDIS_NODES:?"REDIS_NODES: the service names of the nodes, separated by spaces"}
port=${REDIS_PORT:-6379}
first=${nodes%% *}

cluster_info() {
    redis-cli -h "$1" -p "$port" cluster info | tr -d '\r' | sed -n "s/^$2://p"
}

wait_until_ok() {
    for node in $nodes; do
        tries=0
        until [ "$(cluster_info "$node" cluster_state)" = ok ]; do
            tries=$((tries + 1))
            if [ "$tries" -ge 60 ]; then
                echo "Redis node '$node' did not report cluster_state:ok within 60 s" >&2
                exit 1
            fi
            sleep 1
        done
    done
}

# A node that already holds slots belongs to a cluster formed earlier (its nodes.conf
# survived in its volume); after a restart it may take a few seconds to report ok.
assigned=$(cluster_info "$first" cluster_slots_assigned)
if [ -z "$assigned" ]; then
    echo "cannot read CLUSTER INFO from Redis node '$first'" >&2
    exit 1
fi
if [ "$assigned" != 0 ]; then
    wait_until_ok
    echo "Redis Cluster already formed"
    exit 0
fi

# CLUSTER MEET wants addresses; the nodes announce their names to clients themselves.
addresses=""
for node in $nodes; do
    address=$(getent ahostsv4 "$node" | awk '{ print $1; exit }')
    if [ -z "$address" ]; then
        echo "cannot resolve Redis node '$node'" >&2
        exit 1
    fi
    addresses="$addresses $address:$port"
done

# shellcheck disable=SC2086 # one argument per node
redis-cli --cluster create $addresses --cluster-replicas 0 --cluster-yes

wait_until_ok
echo "Redis Cluster formed:$addresses"
