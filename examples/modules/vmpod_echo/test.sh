#!/bin/sh
# Runs in a container in the guest, with the module loaded.
set -e
test -c /dev/vmpod_echo
printf 'hello from %s' "$(uname -r)" > /dev/vmpod_echo
got=$(cat /dev/vmpod_echo)
echo "read back: $got"
[ "$got" = "hello from $(uname -r)" ]
[ "$(cat /sys/module/vmpod_echo/parameters/writes)" = 1 ]
echo PASS
