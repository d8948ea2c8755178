#!/bin/sh
# Installs the baseline servers the benchmark compares Otter with, Debian's
# `mosquitto` and `nginx`, if they are missing. The benchmark calls this
# itself before it starts them; it never relies on a hand install.
#
# The packages' own services must not start: mosquitto's would listen on
# 1883 and nginx's on 80. A policy-rc.d that refuses service starts is put
# in place for the duration of the install (unless one already exists, as in
# most containers) and removed afterwards. The baselines start their own
# instances on their own ports with generated configurations.
set -eu

missing=""
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$missing mosquitto"
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx"
if [ -z "$missing" ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    sudo=sudo
else
    sudo=
fi

policy=/usr/sbin/policy-rc.d
created_policy=no
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod 755 "$policy"
    created_policy=yes
fi
cleanup() {
    if [ "$created_policy" = yes ]; then
        $sudo rm -f "$policy"
    fi
}
trap cleanup EXIT

echo "installing:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
# Only refresh the package lists when the install fails without it.
# shellcheck disable=SC2086
if ! $sudo apt-get install -y --no-install-recommends $missing >&2; then
    $sudo apt-get update >&2
    # shellcheck disable=SC2086
    $sudo apt-get install -y --no-install-recommends $missing >&2
fi
